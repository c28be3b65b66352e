"""What is trained: a LoRA-family adapter through PEFT (lora, dora, loraplus, qlora), or every weight.

LoRA+ differs from LoRA only in the optimizer (B matrices learn faster), which the training
session builds; QLoRA differs in how the base is loaded (4-bit NF4, `load.load_model`).
"""

from __future__ import annotations

import math
from typing import Any

from shitate.config import AdapterSpec
from shitate.errors import ConfigError
from shitate.progress import say

# bitsandbytes trains a 4-bit base on a CPU from 0.49 (its CPU backend); 0.50.2 is what the tests and the README's
# figures ran on. On CUDA any version the `qlora` extra allows works.
_CPU_BITSANDBYTES = (0, 49)


def check_supported(spec: AdapterSpec, device_type: str) -> None:
    """Refuse a method this machine cannot train, before anything loads, naming what is missing."""
    if spec.method != "qlora":
        return
    from importlib.metadata import PackageNotFoundError, version

    try:
        installed = version("bitsandbytes")
    except PackageNotFoundError:
        installed = None
    if installed is None:
        problem = "the bitsandbytes package, which is not installed: pip install 'shitate[qlora]'"
    elif device_type == "cpu" and tuple(int(p) for p in installed.split(".")[:2] if p.isdigit()) < _CPU_BITSANDBYTES:
        problem = (f"bitsandbytes {'.'.join(map(str, _CPU_BITSANDBYTES))} or later to train on a CPU (this machine has "
                   f"{installed}): pip install -U 'shitate[qlora]'")
    else:
        return
    raise ConfigError(f"adapter.method qlora loads the base in 4-bit NF4 through bitsandbytes, which needs {problem}. "
                      "Or use adapter.method: lora — the frozen base is then kept in 16 bits where the model's file or "
                      "the hardware allows.")


def attach(model: Any, spec: AdapterSpec) -> Any:
    """Return the model ready for training under `spec`."""
    if spec.method == "full":
        prefix = _language_model_prefix(model)
        for name, parameter in model.named_parameters():  # a multimodal checkpoint's vision tower stays frozen
            parameter.requires_grad_(prefix is None or name.startswith((prefix, "lm_head")))
        return model
    # Not PEFT's prepare_model_for_kbit_training for qlora: it stores every 16-bit weight left unquantised in fp32 —
    # Gemma's 262k-word embedding, which made QLoRA's peak 0.5 GB above LoRA's — where `widen_arithmetic` computes
    # in fp32 from 16-bit storage; its input gradients serve only reentrant checkpointing, which shitate does not use.
    from peft import LoraConfig, get_peft_model
    from transformers.pytorch_utils import Conv1D

    # GPT-2's layers are Conv1D (weights stored transposed); PEFT adapts them only with fan_in_fan_out, and otherwise
    # switches it on itself with a warning for every run.
    transposed = any(isinstance(module, Conv1D) for module in model.modules())
    config = LoraConfig(r=spec.r, lora_alpha=spec.alpha, lora_dropout=spec.dropout,
                        target_modules=language_model_targets(model, spec.targets), task_type="CAUSAL_LM",
                        use_dora=spec.method == "dora", fan_in_fan_out=transposed)
    return get_peft_model(model, config)


def language_model_targets(model: Any, targets: str | list[str]) -> str | list[str]:
    """The layers to adapt: `targets` as PEFT reads them, except in a multimodal checkpoint (Gemma 3 from 4B up), where
    they are narrowed to the language model's layers — training on text has nothing to teach the vision tower, and
    PEFT's all-linear (or a name such as q_proj, which SigLIP uses too) would adapt it as well."""
    prefix = _language_model_prefix(model)
    if prefix is None:
        return targets
    from torch import nn
    from transformers.pytorch_utils import Conv1D

    return [name for name, module in model.named_modules()
            if name.startswith(prefix) and isinstance(module, (nn.Linear, Conv1D))
            and (targets == "all-linear" or name.rsplit(".", 1)[-1] in targets)]


def _language_model_prefix(model: Any) -> str | None:
    """In a multimodal checkpoint (a vision config beside the text one), where its language model's modules are named
    (`model.language_model.`); None for a text model."""
    if getattr(model.config, "vision_config", None) is None:
        return None
    language_model = model.get_decoder()
    found = next(name for name, module in model.named_modules() if module is language_model)
    return f"{found}." if found else ""


def prepare_for_training(model: Any, spec: AdapterSpec, packed_attention: bool, activation_checkpointing: bool,
                         compute_dtype: Any) -> Any:
    """Packed attention, the adapter, the lean forwards, the arithmetic's dtype and checkpointing, in the order they
    must be applied."""
    from shitate.models.attention import use_packed_attention
    from shitate.models.lean import make_lean
    from shitate.models.precision import widen_arithmetic

    if packed_attention:
        use_packed_attention(model)
    model = attach(model, spec)
    lean = make_lean(model)
    if lean.skipped_adapters:
        say(f"[yellow]note:[/] {lean.skipped_adapters} adapted layers ({spec.method}) run PEFT's own forward, not "
            "shitate's lean one (it supports plain LoRA on nn.Linear and 4-bit layers): expect more memory "
            "per token" + (" than with adapter.method lora." if spec.method != "lora" else "."))
    widen_arithmetic(model, compute_dtype)  # on a GPU 4-bit layers keep bitsandbytes' forward and compute dtype
    if activation_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def trainable_state(model: Any) -> dict[str, Any]:
    """Only the tensors that training changes: what a checkpoint must keep."""
    return {name: p.detach().cpu().clone() for name, p in model.named_parameters() if p.requires_grad}


def count_parameters(model: Any) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    def elements(parameter: Any) -> int:  # a 4-bit weight packs two in a byte; its quant state keeps the real shape
        shape = getattr(getattr(parameter, "quant_state", None), "shape", None)
        return math.prod(shape) if shape is not None else parameter.numel()

    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(elements(p) for p in model.parameters())
