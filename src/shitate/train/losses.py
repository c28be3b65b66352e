"""The loss where the answers are: logits only at labelled positions, never all at once.

Gemma 3's output layer maps 640 features to 262,144 words: for a batch of 8×256 tokens the
full logits are 2 GB in fp32, and most positions (system prompt, question, padding) carry no
loss. We run the decoder, keep the hidden states at positions that predict a label, and
project them in chunks inside one autograd function that also computes the gradient of each
chunk right away, so neither the logits nor their gradient outlive a chunk and the output
layer is applied once forward and once backward, as in the plain loss.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from shitate.data.templates import IGNORE_INDEX


class _LinearCrossEntropy(torch.autograd.Function):
    """sum_i CE(softcap(h_i W^T), y_i), with the gradient taken chunk by chunk in forward."""

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_size: int,
                compute_dtype: torch.dtype, softcap: float | None) -> torch.Tensor:
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if need_weight else None
        w = weight.to(compute_dtype)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        # Even chunks (130 rows in two of 65, not 128 + 2): each chunk streams the whole output layer.
        chunk_size = math.ceil(hidden.shape[0] / max(1, math.ceil(hidden.shape[0] / chunk_size)))
        for start in range(0, hidden.shape[0], chunk_size):
            h = hidden[start:start + chunk_size].to(compute_dtype)
            y = targets[start:start + chunk_size]
            # The chunk's logits stay in the matmul's dtype and become their own gradient in place;
            # fp32 work happens a vocabulary slice at a time, in cache, never a chunk-sized fp32 copy.
            logits = h @ w.T
            row_max, sums = _row_max_and_sum_exp(logits, softcap)
            target_logits = _softcapped(logits.gather(1, y[:, None]).squeeze(1).float(), softcap)
            total += (sums.log() + row_max - target_logits).sum()
            if need_hidden or need_weight:
                _softmax_minus_one_hot_(logits, y, row_max, sums, softcap)
                if need_hidden:
                    grad_hidden[start:start + chunk_size] = (logits @ w).to(hidden.dtype)
                if need_weight:
                    grad_weight += (logits.T @ h).float()
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[Any, ...]:
        grad_hidden, grad_weight = ctx.saved_tensors
        return (None if grad_hidden is None else grad_hidden * grad_output.to(grad_hidden.dtype),
                None if grad_weight is None else (grad_weight * grad_output).to(ctx.weight_dtype),
                None, None, None, None)


_SLICE_ELEMENTS = 2**19  # 2 MB of fp32 per vocabulary slice: its work stays in a core's cache


def _vocab_slice(rows: int) -> int:
    return max(1024, _SLICE_ELEMENTS // max(rows, 1))


def _softcapped(logits: torch.Tensor, softcap: float | None) -> torch.Tensor:
    return logits if not softcap else torch.tanh(logits / softcap) * softcap


def _row_max_and_sum_exp(logits: torch.Tensor, softcap: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: the largest (soft-capped) logit and sum(exp(logit - max)), in fp32."""
    row_max = _softcapped(logits.amax(dim=-1).float(), softcap)  # soft-capping keeps the order
    sums = torch.zeros_like(row_max)
    width = _vocab_slice(logits.shape[0])
    for start in range(0, logits.shape[1], width):
        piece = _softcapped(logits[:, start:start + width].float(), softcap)
        sums += (piece - row_max[:, None]).exp_().sum(dim=-1)  # not in place: in fp32, piece is the logits
    return row_max, sums


def _softmax_minus_one_hot_(logits: torch.Tensor, targets: torch.Tensor, row_max: torch.Tensor, sums: torch.Tensor,
                            softcap: float | None) -> None:
    """Overwrite logits with d(loss)/d(logits): softmax − one-hot, times the soft-cap's derivative."""
    rows = torch.arange(targets.shape[0], device=targets.device)
    # exp is taken again here rather than kept from the sum pass: keeping it would mean a chunk-sized fp32
    # buffer, or rounding it to bf16 before normalising; a second exp of a cached slice costs less.
    width = _vocab_slice(logits.shape[0])
    for start in range(0, logits.shape[1], width):
        raw = logits[:, start:start + width].float()
        capped = _softcapped(raw, softcap)
        grad = capped.sub(row_max[:, None]).exp_().div_(sums[:, None])
        inside = (targets >= start) & (targets < start + raw.shape[1])
        grad[rows[inside], targets[inside] - start] -= 1.0
        if softcap:
            grad.mul_(1.0 - (capped / softcap) ** 2)
        logits[:, start:start + width] = grad


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_size: int = 128,
                         compute_dtype: torch.dtype = torch.float32, softcap: float | None = None) -> torch.Tensor:
    """Summed cross-entropy of `hidden @ weight.T` against `targets`, chunked over rows."""
    return _LinearCrossEntropy.apply(hidden, weight, targets, chunk_size, compute_dtype, softcap)


class AnswerLoss(nn.Module):
    """Wraps a causal LM so that forward returns (summed answer loss, number of answer tokens).

    Being a module (not a function) lets DDP/FSDP wrap it and sync gradients as usual.
    """

    chunk_size = 128  # positions whose logits exist at once: 67 MB in bf16 for Gemma 3's 262k words

    def __init__(self, causal_lm: nn.Module, compute_dtype: torch.dtype = torch.float32, chunk_size: int | None = None) -> None:
        super().__init__()
        self.causal_lm = causal_lm
        self.compute_dtype = compute_dtype
        self.chunk_size = chunk_size or AnswerLoss.chunk_size

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None,
                packed_lengths: list[list[int]] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        base = self.causal_lm.get_base_model() if hasattr(self.causal_lm, "get_base_model") else self.causal_lm
        extra: dict[str, Any] = {}
        if packed_lengths is not None:
            extra["packed_lengths"] = packed_lengths
            layer_types = getattr(base.config, "layer_types", None)
            if layer_types:  # a per-layer-type mapping tells the model its masks are handled: none are built
                attention_mask = {layer_type: None for layer_type in set(layer_types)}
        outputs = base.get_decoder()(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                     use_cache=False, **extra)
        targets = labels[:, 1:]
        keep = targets != IGNORE_INDEX
        hidden = outputs.last_hidden_state[:, :-1][keep]
        softcap = getattr(base.config, "final_logit_softcapping", None)
        total = linear_cross_entropy(hidden, base.get_output_embeddings().weight, targets[keep], self.chunk_size,
                                     self.compute_dtype, softcap)
        return total, keep.sum()
