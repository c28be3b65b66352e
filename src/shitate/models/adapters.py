"""Attach what is trained: a LoRA adapter through PEFT, or every weight for a full fine-tune."""

from __future__ import annotations

from typing import Any

from shitate.config import AdapterSpec


def attach(model: Any, spec: AdapterSpec) -> Any:
    """Return the model ready for training under `spec`."""
    if spec.method == "full":
        for parameter in model.parameters():
            parameter.requires_grad_(True)
        return model
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=spec.r, lora_alpha=spec.alpha, lora_dropout=spec.dropout,
                        target_modules=spec.targets, task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def trainable_state(model: Any) -> dict[str, Any]:
    """Only the tensors that training changes: what a checkpoint must keep."""
    return {name: p.detach().cpu().clone() for name, p in model.named_parameters() if p.requires_grad}


def count_parameters(model: Any) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())
