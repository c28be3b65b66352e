"""Time the default model's loads: straight from the GGUF (what every load would cost without the cache)
and from shitate's safetensors cache. Prints seconds; run with the project's virtual environment."""

import time

import torch

from shitate.models.load import load_model, load_tokenizer, resolve
from shitate.models.store import default_gguf


def timed(label, fn):
    started = time.perf_counter()
    result = fn()
    print(f"{label:<38} {time.perf_counter() - started:6.1f} s", flush=True)
    return result


def main() -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = default_gguf()
    timed("GGUF: tokenizer + model (transformers)", lambda: (
        AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name),
        AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)))
    source = timed("resolve gemma-3-270m (cache exists)", lambda: resolve("gemma-3-270m", progress=False))
    timed("cache: tokenizer + model", lambda: (load_tokenizer(source), load_model(source)))


if __name__ == "__main__":
    main()
