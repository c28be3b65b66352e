#!/usr/bin/env bash
# The default demo, end to end on a CPU: install, prepare the data, fine-tune Gemma 3 270M,
# then ask the base and the tuned model the 30 held-out questions and score both.
set -euo pipefail
cd "$(dirname "$0")/../.."
started=$(date +%s)

source examples/setup.sh eval
shitate=.venv/bin/shitate
demo=examples/kids_qa
system="あなたは子どもの疑問に簡潔かつわかりやすい言葉で答えるチャットボットです。"

$shitate data import $demo/kids_qa.csv --out $demo/data/all.jsonl --system "$system" --force
# 145 pairs: 30 for validation and 30 held out for the comparison, the rest (85) for training.
$shitate data split $demo/data/all.jsonl --sizes 85/30/30 --seed 42 --out-dir $demo/data --force
$shitate data check $demo/data/train.jsonl --max-length 256
$shitate train $demo/recipe.yaml --out runs/kids-qa --force
$shitate compare gemma-3-270m runs/kids-qa $demo/data/test.jsonl --out runs/kids-qa/compare.jsonl
# The same questions scored against the reference answers, in one HTML page (runs/kids-qa/eval/report.html).
$shitate eval runs/kids-qa

echo "Demo finished in $(( $(date +%s) - started )) s. Answers: runs/kids-qa/compare.jsonl, report: runs/kids-qa/eval/report.html, loss curve: runs/kids-qa/loss.png"
