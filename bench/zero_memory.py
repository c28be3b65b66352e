"""Memory per GPU by engine (DDP, ZeRO-1/2/3 = FSDP full shard) for 1B, 7B and 13B models: the table in the README.

Computed by the dry-run planner (shitate.memory.per_device_bytes), not measured: the models are built on the
meta device from Llama-shaped configs (TinyLlama 1.1B, Llama 2 7B and 13B), so nothing is downloaded and no
GPU is needed. Full fine-tuning and LoRA r=16 on all linear layers; a micro-batch of 4 × 1024 tokens a device
with activation checkpointing, bf16.

    .venv/bin/python bench/zero_memory.py
"""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from shitate.memory import ENGINES, per_device_bytes
from shitate.models.logprobs import loss_workspace_bytes

SHAPES = {  # hidden, intermediate, layers, attention heads, key/value heads
    "1B (TinyLlama 1.1B)": (2048, 5632, 22, 32, 4),
    "7B (Llama 2 7B)": (4096, 11008, 32, 32, 32),
    "13B (Llama 2 13B)": (5120, 13824, 40, 40, 40),
}
LORA_RANK, MICRO_BATCH_TOKENS, DEVICES = 16, 4 * 1024, (2, 8)


def parameters(config: LlamaConfig) -> tuple[int, int]:
    """(all parameters, LoRA r=16 parameters on every linear layer but the output layer)."""
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    total = sum(p.numel() for p in model.parameters())
    lora = sum(LORA_RANK * (m.in_features + m.out_features) for name, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and name != "lm_head")
    return total, lora


def main() -> None:
    header = " | ".join(f"{engine.upper() if engine == 'ddp' else engine.replace('zero', 'ZeRO-')} ×{n}"
                        for n in DEVICES for engine in ENGINES)
    print(f"| model | method | {header} |")
    print("|" + "---|" * (2 + len(DEVICES) * len(ENGINES)))
    for name, (hidden, intermediate, layers, heads, kv_heads) in SHAPES.items():
        config = LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                             num_attention_heads=heads, num_key_value_heads=kv_heads, vocab_size=32000)
        total, lora = parameters(config)
        for method, trained in (("full", total), (f"LoRA r={LORA_RANK}", lora)):
            cells = [sum(per_device_bytes(config, total, trained, MICRO_BATCH_TOKENS, n, engine,
                                          loss_workspace_bytes("cuda", hidden)).values()) / 2**30
                     for n in DEVICES for engine in ENGINES]
            print(f"| {name}, {total / 1e9:.2f} B | {method} | " + " | ".join(f"{gb:.1f}" for gb in cells) + " |")
    print(f"\nGiB per GPU; micro-batch {MICRO_BATCH_TOKENS} tokens a device, activation checkpointing, bf16 weights, "
          "fp32 AdamW state (ZeRO paper accounting).")


if __name__ == "__main__":
    main()
