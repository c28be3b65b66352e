#!/usr/bin/env bash
# Align to house rules with GRPO, no labelled pairs: start from a one-epoch SFT of the demo (which has
# not yet learnt the style), reward sampled answers by the rubric, and compare the rubric on the 30
# held-out questions before (the start run) and after. Run after run.sh (it writes the data files).
set -euo pipefail
cd "$(dirname "$0")/../.."
started=$(date +%s)
shitate=.venv/bin/shitate
demo=examples/kids_qa
$shitate train $demo/recipe.yaml --set name=kids-qa-1epoch --set train.epochs=1 --out runs/kids-qa-1epoch --force
$shitate train $demo/recipe-grpo.yaml --out runs/kids-qa-grpo --force
$shitate eval runs/kids-qa-grpo
echo "Finished in $(( $(date +%s) - started )) s. Report: runs/kids-qa-grpo/eval/report.html"
