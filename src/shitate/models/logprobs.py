"""Answer log-probabilities without materialising the logits: the kernels training and evaluation share.

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

LOSS_CHUNK = 128  # positions whose logits exist at once: 67 MB in bf16 for Gemma 3's 262k words
# A GPU runs a chunk's matmul in microseconds and then waits on the launches of its softmax slices: fewer, larger
# chunks there (512 MB of bf16 logits for Gemma 3; the memory planner counts it).
GPU_LOSS_CHUNK = 1024


def loss_chunk_rows(device: torch.device | str) -> int:
    """Positions projected onto the vocabulary at once on this device."""
    return LOSS_CHUNK if torch.device(device).type == "cpu" else GPU_LOSS_CHUNK


class _LinearCrossEntropy(torch.autograd.Function):
    """CE(softcap(h_i W^T), y_i) for every row i — summed, or per row — with the gradient taken chunk by chunk
    in forward.

    Per row (what sequence log-probabilities need), each row's gradient is scaled by its own
    upstream gradient in backward: exact for the hidden states, whose gradient is row by row; the
    output layer's gradient mixes rows, so it is computed in backward instead, one more pass over
    the output layer, and only when the output layer trains (full fine-tuning).
    """

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_size: int,
                compute_dtype: torch.dtype, softcap: float | None, per_row: bool) -> torch.Tensor:
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if need_weight and not per_row else None
        w = weight.to(compute_dtype)
        losses = torch.zeros(hidden.shape[0], dtype=torch.float32, device=hidden.device)
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
            losses[start:start + chunk_size] = sums.log() + row_max - target_logits
            if need_hidden or grad_weight is not None:
                _softmax_minus_one_hot_(logits, y, row_max, sums, softcap)
                if grad_hidden is not None:
                    grad_hidden[start:start + chunk_size] = (logits @ w).to(hidden.dtype)
                if grad_weight is not None:
                    grad_weight += (logits.T @ h).float()
        ctx.save_for_backward(grad_hidden, grad_weight, *((hidden, weight, targets) if need_weight and per_row else ()))
        ctx.weight_dtype, ctx.per_row, ctx.need_weight = weight.dtype, per_row, need_weight
        ctx.settings = (chunk_size, compute_dtype, softcap)
        return losses if per_row else losses.sum()

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[Any, ...]:
        grad_hidden, grad_weight, *inputs = ctx.saved_tensors
        scale = grad_output[:, None] if ctx.per_row else grad_output
        scale_weight: float | torch.Tensor
        if ctx.per_row and ctx.need_weight:
            hidden, weight, targets = inputs
            grad_weight = _weighted_weight_grad(hidden, weight, targets, grad_output, *ctx.settings)
            scale_weight = 1.0
        else:
            scale_weight = grad_output
        return (None if grad_hidden is None else grad_hidden * scale.to(grad_hidden.dtype),
                None if grad_weight is None else (grad_weight * scale_weight).to(ctx.weight_dtype),
                None, None, None, None, None)


def _weighted_weight_grad(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, row_weights: torch.Tensor,
                          chunk_size: int, compute_dtype: torch.dtype, softcap: float | None) -> torch.Tensor:
    """sum_i w_i d CE_i / dW, recomputing each chunk's logits (see _LinearCrossEntropy)."""
    w = weight.to(compute_dtype)
    grad_weight = torch.zeros_like(weight, dtype=torch.float32)
    for start in range(0, hidden.shape[0], chunk_size):
        h = hidden[start:start + chunk_size].to(compute_dtype)
        logits = h @ w.T
        row_max, sums = _row_max_and_sum_exp(logits, softcap)
        _softmax_minus_one_hot_(logits, targets[start:start + chunk_size], row_max, sums, softcap)
        logits.mul_(row_weights[start:start + chunk_size, None].to(logits.dtype))
        grad_weight += (logits.T @ h).float()
    return grad_weight


_SLICE_ELEMENTS = 2**19  # 2 MB of fp32 per vocabulary slice: its work stays in a core's cache
# A GPU has no such cache to fit and pays a kernel launch per small op: 8 slices of Gemma's vocabulary (16 MB of fp32
# a slice for a 128-row chunk) instead of 64. Not yet timed on a GPU.
_GPU_SLICE_ELEMENTS = 2**22


def _vocab_slice(logits: torch.Tensor) -> int:
    elements = _SLICE_ELEMENTS if logits.device.type == "cpu" else _GPU_SLICE_ELEMENTS
    return max(1024, elements // max(logits.shape[0], 1))


def _softcapped(logits: torch.Tensor, softcap: float | None) -> torch.Tensor:
    return logits if not softcap else torch.tanh(logits / softcap) * softcap


def _row_max_and_sum_exp(logits: torch.Tensor, softcap: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: the largest (soft-capped) logit and sum(exp(logit - max)), in fp32."""
    row_max = _softcapped(logits.amax(dim=-1).float(), softcap)  # soft-capping keeps the order
    sums = torch.zeros_like(row_max)
    width = _vocab_slice(logits)
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
    width = _vocab_slice(logits)
    for start in range(0, logits.shape[1], width):
        raw = logits[:, start:start + width].float()
        capped = _softcapped(raw, softcap)
        grad = capped.sub(row_max[:, None]).exp_().div_(sums[:, None])
        # The one-hot part of this slice, without selecting rows by a mask: a masked index makes a GPU wait for
        # the mask's count before it can go on, once per slice. Rows whose target lies elsewhere subtract 0.
        inside = (targets >= start) & (targets < start + raw.shape[1])
        grad[rows, torch.where(inside, targets - start, 0)] -= inside.to(grad.dtype)
        if softcap:
            grad.mul_(1.0 - (capped / softcap) ** 2)
        logits[:, start:start + width] = grad


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         chunk_size: int | None = None, compute_dtype: torch.dtype = torch.float32,
                         softcap: float | None = None, per_row: bool = False) -> torch.Tensor:
    """Cross-entropy of `hidden @ weight.T` against `targets`, chunked over rows (by default as suits the device):
    summed, or one value per row."""
    chunk_size = chunk_size or loss_chunk_rows(hidden.device)
    return _LinearCrossEntropy.apply(hidden, weight, targets, chunk_size, compute_dtype, softcap, per_row)


def decoder_states(causal_lm: Any, input_ids: torch.Tensor, attention_mask: Any = None,
                   position_ids: torch.Tensor | None = None,
                   packed_lengths: list[list[Any]] | None = None) -> tuple[Any, torch.Tensor]:
    """(the bare causal LM, the decoder's last hidden states): every loss projects only the positions it needs."""
    base = causal_lm.get_base_model() if hasattr(causal_lm, "get_base_model") else causal_lm
    extra: dict[str, Any] = {}
    if packed_lengths is not None:
        extra["packed_lengths"] = packed_lengths
        layer_types = getattr(base.config, "layer_types", None)
        if layer_types:  # a per-layer-type mapping tells the model its masks are handled: none are built
            attention_mask = {layer_type: None for layer_type in set(layer_types)}
    outputs = base.get_decoder()(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                 use_cache=False, **extra)
    return base, outputs.last_hidden_state


class AnswerLogProbs(nn.Module):
    """Summed log-probability and token count of each answer in a tree batch (data/collate.tree_batch)."""

    causal_lm: Any  # a transformers model (or PEFT's wrapper of one): typed loosely upstream

    def __init__(self, causal_lm: nn.Module, compute_dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.causal_lm = causal_lm
        self.compute_dtype = compute_dtype

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, packed_lengths: list[list[Any]],
                sources: torch.Tensor, targets: torch.Tensor, owners: torch.Tensor,
                answers: int) -> tuple[torch.Tensor, torch.Tensor]:
        token_logps, _ = self.token_logps(input_ids, position_ids, packed_lengths, sources, targets, owners, answers)
        logps = torch.zeros(answers, dtype=torch.float32, device=token_logps.device).index_add(0, owners, token_logps)
        return logps, torch.bincount(owners, minlength=answers)

    def token_logps(self, input_ids: torch.Tensor, position_ids: torch.Tensor, packed_lengths: list[list[Any]],
                    sources: torch.Tensor, targets: torch.Tensor, owners: torch.Tensor,
                    answers: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(log-probability of each answer token, in the batch's order; the decoder's hidden states)."""
        base, states = decoder_states(self.causal_lm, input_ids, None, position_ids, packed_lengths)
        hidden = states.reshape(-1, states.shape[-1])[sources]
        softcap = getattr(base.config, "final_logit_softcapping", None)
        token_losses = linear_cross_entropy(hidden, base.get_output_embeddings().weight, targets,
                                            compute_dtype=self.compute_dtype, softcap=softcap, per_row=True)
        return -token_losses, states


def logprob_inputs(batch: dict[str, Any]) -> dict[str, Any]:
    """What AnswerLogProbs takes from a tree batch (data/collate.tree_batch)."""
    keys = ("input_ids", "position_ids", "packed_lengths", "sources", "targets", "owners")
    return {**{key: batch[key] for key in keys}, "answers": batch["last"].shape[0]}
