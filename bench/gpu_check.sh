#!/usr/bin/env bash
# The CUDA checks for a short GPU lease, in one command: the tests that train, align, export and serve on the GPU
# (QLoRA among them), then the SFT bench against TRL on a model of the default's shape.
#
#   bash bench/gpu_check.sh prepare   # here, with the network of the package registry: wheels + the model's shape
#   bash bench/gpu_check.sh run       # there (no network): install the wheels, test, bench; logs under $OUT
#
# `prepare` writes two git-ignored folders that travel with the working tree (name them in the lease's carry):
# .whl/ — wheels of what the GPU image lacks (bitsandbytes, pydantic, TRL, …; its own torch, transformers, tokenizers
# and huggingface_hub are kept) — and .gpu/gemma-270m-shape/ — the default model's config and tokenizer, without its
# weights (too large to carry): `run` builds a model of that shape with random weights, which times like the real one.
# Environment for `run`: LOSS=0 skips bench/gpu_loss_check.py (the blocked loss against the plain one, and its block
# sizes timed); TESTS=0 skips the tests; PROFILE=1 adds bench/gpu_profile.py (where the time goes), PROFILE_EPOCHS its epochs;
# TEST_PATHS, EPOCHS (default 1), SIDES, LOSS_S, TEST_S, BENCH_S and PROFILE_S (time limits).
set -uo pipefail
cd "$(dirname "$0")/.."

prepare() {
    local python=${PYTHON:-.venv/bin/python} platforms=()
    for tag in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64; do
        platforms+=(--platform "$tag")
    done
    mkdir -p .whl .gpu/gemma-270m-shape
    grep -qx '/.whl/' .git/info/exclude 2>/dev/null || printf '/.whl/\n/.gpu/\n' >> .git/info/exclude
    # The versions this checkout was tested with; datasets 4.x because the image's huggingface_hub is 1.x.
    local pinned
    pinned=$("$python" -m pip list --format=freeze 2>/dev/null | grep -iE '^(peft|pydantic|pydantic_core|annotated-types|typing-inspection|gguf|trl|fastapi|starlette|uvicorn|sniffio|dill|multiprocess)==')
    # shellcheck disable=SC2086
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${platforms[@]}" \
        -d .whl $pinned 'datasets>=4.7,<5' bitsandbytes pytest-xdist execnet datasketch || return 1
    "$python" - <<'EOF' || return 1
import lzma, shutil
from pathlib import Path

from shitate.models.load import resolve

source = Path(resolve("gemma-3-270m", progress=False).folder)
target = Path(".gpu/gemma-270m-shape")
for name in ("config.json", "generation_config.json", "tokenizer_config.json"):
    shutil.copy(source / name, target / name)
(target / "tokenizer.json.xz").write_bytes(lzma.compress((source / "tokenizer.json").read_bytes(), preset=9))
EOF
    du -sh .whl .gpu
}

run() {
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
    export OUT=${OUT:-/tmp/gpu-check}
    mkdir -p "$OUT"
    nvidia-smi -L; lscpu | grep "Model name"
    python3 -c "
import torch, transformers, peft, accelerate, bitsandbytes, trl, datasets
print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__,
      'accelerate', accelerate.__version__, 'bitsandbytes', bitsandbytes.__version__, 'trl', trl.__version__,
      'datasets', datasets.__version__)"
    local start=$SECONDS
    if [ "${LOSS:-1}" = 1 ]; then
        timeout "${LOSS_S:-90}" python3 bench/gpu_loss_check.py > "$OUT/loss.log" 2>&1
        echo "loss check rc $? in $((SECONDS - start)) s"
        cat "$OUT/loss.log"
        start=$SECONDS
    fi
    if [ "${TESTS:-1}" = 1 ]; then
        # Not the whole suite: documents, scrubbing, dedupe and the UI need packages the image lacks and no GPU.
        local paths=${TEST_PATHS:-"tests/unit tests/integration/test_train.py tests/integration/test_align.py
            tests/integration/test_rl.py tests/integration/test_export.py tests/integration/test_pretrain.py
            tests/integration/test_serve.py"}
        # shellcheck disable=SC2086
        timeout "${TEST_S:-280}" python3 -m pytest -q -p no:cacheprovider -n 6 -m 'not slow' $paths > "$OUT/tests.log" 2>&1
        echo "tests rc $? in $((SECONDS - start)) s"
        grep -E "passed|failed|^FAILED|^ERROR" "$OUT/tests.log" | tail -40
    fi
    start=$SECONDS
    xz -dkf .gpu/gemma-270m-shape/tokenizer.json.xz
    python3 -c "
import shutil, torch
from transformers import AutoConfig, AutoModelForCausalLM
torch.manual_seed(0)
model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained('.gpu/gemma-270m-shape'), dtype=torch.bfloat16)
model.save_pretrained('/tmp/gemma-270m-shape')
for name in ('tokenizer.json', 'tokenizer_config.json', 'generation_config.json'):
    shutil.copy('.gpu/gemma-270m-shape/' + name, '/tmp/gemma-270m-shape/' + name)
"
    timeout "${BENCH_S:-200}" python3 bench/train_throughput.py --data kids --model /tmp/gemma-270m-shape \
        --epochs "${EPOCHS:-1}" --sides "${SIDES:-shitate,shitate-percall,trl-pad,trl-pad-bf16,trl-pack-bf16}" 2>&1 | tee "$OUT/bench.log"
    echo "bench rc $? in $((SECONDS - start)) s"
    if [ "${PROFILE:-0}" = 1 ]; then
        start=$SECONDS
        timeout "${PROFILE_S:-150}" python3 bench/gpu_profile.py --model /tmp/gemma-270m-shape --epochs "${PROFILE_EPOCHS:-1}" > "$OUT/profile.log" 2>&1
        echo "profile rc $? in $((SECONDS - start)) s"
        head -3 "$OUT/profile.log"
    fi
}

case "${1:-}" in
    prepare) prepare ;;
    run) run ;;
    *) echo "usage: bash bench/gpu_check.sh prepare|run" >&2; exit 2 ;;
esac
