#!/usr/bin/env bash
# Continued pretraining on a real Japanese chat corpus, with generations from the same short prompts
# before and after (the seed talk's 「ww」 demo) and the held-out perplexity. Run from anywhere.
set -euo pipefail
cd "$(dirname "$0")/../.."
source examples/setup.sh
shitate=.venv/bin/shitate
demo=examples/chat_corpus
prompts=("こんにちは！" "最近ハマっていることは" "休みの日は" "夏といえば")
# Greedy, with a repetition penalty: a 270M model otherwise repeats one line until the token limit.
settings=(--max-new-tokens 40 --repetition-penalty 1.3)

.venv/bin/python $demo/prepare.py
$shitate data check $demo/data/train.jsonl --max-length 256
echo "== before (base model) =="
for p in "${prompts[@]}"; do $shitate generate gemma-3-270m "$p" "${settings[@]}"; echo "--"; done
$shitate train $demo/recipe.yaml --out runs/chat-corpus --force
echo "== after (runs/chat-corpus) =="
for p in "${prompts[@]}"; do $shitate generate runs/chat-corpus "$p" "${settings[@]}"; echo "--"; done
.venv/bin/python -c "import json; m = json.load(open('runs/chat-corpus/manifest.json')); print('perplexity on held-out dialogues:', m['perplexity'])"
