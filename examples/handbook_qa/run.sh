#!/usr/bin/env bash
# A company's rules → passages → question/answer pairs → context-grounded tuning of Gemma 3 270M → the base
# and the tuned model on held-out questions, scored. Everything stays on this machine. Run from anywhere.
#   bash examples/handbook_qa/run.sh            questions from the articles' titles (template mode, no model)
#   bash examples/handbook_qa/run.sh model      questions written by a generator model (GENERATOR, default the
#                                               default model; a model folder, .gguf, run folder or server URL)
set -euo pipefail
mode=${1:-template}
case $mode in template|model) ;; *) echo "usage: run.sh [template|model]" >&2; exit 2 ;; esac
cd "$(dirname "$0")/../.."
started=$(date +%s)
source examples/setup.sh eval,documents
shitate=.venv/bin/shitate
demo=examples/handbook_qa
handbook=../shared/data/employee-handbook
# Each mode keeps its own pairs, splits and run, so the two can be compared.
if [ "$mode" = template ]; then data=data; run=runs/handbook-qa; else data=data/model; run=runs/handbook-qa-model; fi

# Markdown (also .txt in Shift_JIS/EUC-JP, .html, .pdf, .docx) → passages split by heading and 第N条.
$shitate data import $handbook --out $demo/data/passages.jsonl --max-chars 400 --force
if [ "$mode" = template ]; then
  # Questions from the articles' own titles, answers from their text: no model needed.
  $shitate data synth $demo/data/passages.jsonl --out $demo/$data/qa.jsonl --force
else
  # A generator reads each passage and writes pairs with the few-shot prompt in src/shitate/data/prompts/.
  $shitate data synth $demo/data/passages.jsonl --out $demo/$data/qa.jsonl --mode model \
    --generator "${GENERATOR:-gemma-3-270m}" --force
fi
# Nothing personal should go into training: list what the scrubber would mask (rules name no one).
$shitate data scrub $demo/$data/qa.jsonl --dry-run
# Questions about one passage stay in one split, so the test asks about articles training never saw.
$shitate data split $demo/$data/qa.jsonl --sizes 0.8/0.1/0.1 --seed 42 --out-dir $demo/$data --force
# Template questions share long boilerplate (「就業規則では、…についてどのように定められていますか。」): flag from 0.9.
$shitate data check $demo/$data/train.jsonl --max-length 1280 --against $demo/$data/test.jsonl --threshold 0.9
$shitate train $demo/recipe.yaml --out $run --force \
  --set data.train=$data/train.jsonl --set data.validation=$data/validation.jsonl --set data.test=$data/test.jsonl
$shitate compare gemma-3-270m $run $demo/$data/test.jsonl --out $run/compare.jsonl
$shitate eval $run
# Questions as an employee would ask them, with short answers that cite the article (written by hand).
.venv/bin/python $demo/attach_context.py
$shitate eval $run --test $demo/data/questions.jsonl --out $run/eval-handwritten

echo "Finished in $(( $(date +%s) - started )) s. Answers: $run/compare.jsonl; reports:" \
     "$run/eval/report.html (generated test questions), $run/eval-handwritten/report.html"
