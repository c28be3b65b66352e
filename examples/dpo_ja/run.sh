#!/usr/bin/env bash
# Preference alignment on a CPU: pairs from GPT-4's pairwise judgments of Japanese Vicuna answers
# (../shared/data/ja-vicuna-qa), then DPO and ORPO on Gemma 3 270M (base), each measured on held-out
# questions before and after: how often the model finds the judged-better answer likelier.
set -euo pipefail
cd "$(dirname "$0")/../.."
started=$(date +%s)
source examples/setup.sh eval
shitate=.venv/bin/shitate
demo=examples/dpo_ja
judgments=${JUDGMENTS:-../shared/data/ja-vicuna-qa/model_judgment/pairwise/gpt-4}

# A pair where GPT-4 picked the same winner with the answers in both orders (ties and flips dropped).
$shitate data import "$judgments" --out $demo/data/pairs.jsonl --force
# Split by question: every pair of one question lands in one split, so the held-out questions are new.
$shitate data split $demo/data/pairs.jsonl --sizes 0.8/0.1/0.1 --seed 42 --out-dir $demo/data --force
$shitate data check $demo/data/train.jsonl --max-length 256 > /dev/null
$shitate train $demo/recipe-dpo.yaml --out runs/dpo-ja --force
$shitate train $demo/recipe-orpo.yaml --out runs/orpo-ja --force
# Preference accuracy on the test pairs, base vs tuned (runs/*/eval/report.html).
$shitate eval runs/dpo-ja
$shitate eval runs/orpo-ja
# A few answers side by side: the base model, and the same model after DPO and after ORPO.
# (the test file holds several pairs per question: keep four different questions)
.venv/bin/python -c "import json,sys; seen=dict.fromkeys(json.loads(l)['prompt'] for l in open(sys.argv[1])); [print(json.dumps({'prompt': q}, ensure_ascii=False)) for q in list(seen)[:4]]" $demo/data/test.jsonl > $demo/data/prompts.jsonl
$shitate compare gemma-3-270m runs/dpo-ja $demo/data/prompts.jsonl --out runs/dpo-ja/compare.jsonl --max-new-tokens 80
$shitate compare gemma-3-270m runs/orpo-ja $demo/data/prompts.jsonl --out runs/orpo-ja/compare.jsonl --max-new-tokens 80
echo "Finished in $(( $(date +%s) - started )) s."
