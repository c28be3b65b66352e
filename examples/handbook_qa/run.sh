#!/usr/bin/env bash
# A company's rules → passages → question/answer pairs → context-grounded tuning of Gemma 3 270M → the base
# and the tuned model on held-out questions, scored. Everything stays on this machine. Run from anywhere.
set -euo pipefail
cd "$(dirname "$0")/../.."
started=$(date +%s)
source examples/setup.sh eval,documents
shitate=.venv/bin/shitate
demo=examples/handbook_qa
handbook=../shared/data/employee-handbook

# Markdown (also .txt in Shift_JIS/EUC-JP, .html, .pdf, .docx) → passages split by heading and 第N条.
$shitate data import $handbook --out $demo/data/passages.jsonl --max-chars 400 --force
# Questions from the articles' own titles, answers from their text (no model needed; --mode model uses one).
$shitate data synth $demo/data/passages.jsonl --out $demo/data/qa.jsonl --force
# Nothing personal should go into training: list what the scrubber would mask (rules name no one).
$shitate data scrub $demo/data/qa.jsonl --dry-run
# Questions about one passage stay in one split, so the test asks about articles training never saw.
$shitate data split $demo/data/qa.jsonl --sizes 0.8/0.1/0.1 --seed 42 --out-dir $demo/data --force
# Template questions share long boilerplate (「就業規則では、…についてどのように定められていますか。」): flag from 0.9.
$shitate data check $demo/data/train.jsonl --max-length 1280 --against $demo/data/test.jsonl --threshold 0.9
$shitate train $demo/recipe.yaml --out runs/handbook-qa --force
$shitate compare gemma-3-270m runs/handbook-qa $demo/data/test.jsonl --out runs/handbook-qa/compare.jsonl
$shitate eval runs/handbook-qa
# Questions as an employee would ask them, with short answers that cite the article (written by hand).
.venv/bin/python $demo/attach_context.py
$shitate eval runs/handbook-qa --test $demo/data/questions.jsonl --out runs/handbook-qa/eval-handwritten

echo "Finished in $(( $(date +%s) - started )) s. Answers: runs/handbook-qa/compare.jsonl; reports:" \
     "runs/handbook-qa/eval/report.html (generated test questions), runs/handbook-qa/eval-handwritten/report.html"
