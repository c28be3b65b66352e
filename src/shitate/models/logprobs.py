"""Answer log-probabilities without materialising the logits: the kernels training and evaluation share.

Gemma 3's output layer maps 640 features to 262,144 words: for a batch of 8×256 tokens the
full logits are 2 GB in fp32, and most positions (system prompt, question, padding) carry no
loss. We run the decoder, keep the hidden states at positions that predict a label, and
project them a block of words at a time inside one autograd function that also computes the
gradient of the hidden states on the way, as flash attention does for its softmax: a running
maximum, a running sum of exponentials and a running sum of exp(logit)·w, rescaled whenever the
maximum grows. Neither the logits nor their gradient ever exist beyond one block, and the
output layer is applied once forward and once backward, as in the plain loss.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

# Positions projected at once. A block's logits are rows × words, so more rows mean fewer, wider
# passes over the output layer (it is streamed from memory once per pass) at the same memory.
LOSS_CHUNK = 512
# A GPU runs a pass's matmuls in microseconds and then waits on the launches of its elementwise ops: larger blocks
# there. Timed on an H100 (bench/gpu_loss_check.py, 2048 rows at the default model's shape, forward + backward):
# 2**25 elements (32,768 words a block) take 11.4 ms at 0.34 GB, as fast as the plain loss on materialised logits
# (11.2 ms at 6.44 GB); 2**24 took 13.0 ms, 2**26 10.5 ms at twice the memory.
GPU_LOSS_CHUNK = 1024
_BLOCK_ELEMENTS = 2**20  # logits of one block on a CPU: 4 MB in fp32, within a core's cache
_GPU_BLOCK_ELEMENTS = 2**25
_WIDENED_BLOCK_WORDS = 4096


def loss_chunk_rows(device: torch.device | str) -> int:
    """Positions projected onto the vocabulary at once on this device."""
    return LOSS_CHUNK if torch.device(device).type == "cpu" else GPU_LOSS_CHUNK


def _vocab_block(rows: int, device: torch.device) -> int:
    elements = _BLOCK_ELEMENTS if device.type == "cpu" else _GPU_BLOCK_ELEMENTS
    return max(1024, elements // max(rows, 1))


def loss_workspace_bytes(device: torch.device | str, hidden_size: int) -> int:
    """What one chunk of the loss holds at once, for the memory planner: a block's logits and their
    exponentials in fp32, and the running sums for its rows."""
    rows = loss_chunk_rows(device)
    return 3 * 4 * rows * _vocab_block(rows, torch.device(device)) + 2 * 4 * rows * hidden_size


class _LinearCrossEntropy(torch.autograd.Function):
    """CE(softcap(h_i W^T), y_i) for every row i — summed, or per row — with the hidden states' gradient taken in
    forward, on the way; and beside it, the rows whose target is the likeliest token (counted, or per row).

    The output layer's gradient (full fine-tuning) mixes rows and needs each row's final normaliser, so it
    is computed in backward, one more pass over the output layer, and only when the output layer trains.
    """

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_size: int,
                compute_dtype: torch.dtype, softcap: float | None, per_row: bool) -> tuple[torch.Tensor, torch.Tensor]:
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        losses = torch.zeros(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        row_max, sums, target_logits = torch.empty_like(losses), torch.empty_like(losses), torch.empty_like(losses)
        # Even chunks (130 rows in two of 65, not 128 + 2): each chunk streams the whole output layer.
        chunk_size = math.ceil(hidden.shape[0] / max(1, math.ceil(hidden.shape[0] / chunk_size)))
        for start in range(0, hidden.shape[0], chunk_size):
            rows = slice(start, start + chunk_size)
            h = hidden[rows].to(compute_dtype)
            losses[rows], row_max[rows], sums[rows], target_logits[rows], grad = _online_softmax_pass(
                h, weight, targets[rows], softcap, need_hidden)
            if grad_hidden is not None:
                grad_hidden[rows] = grad.to(hidden.dtype)
        ctx.save_for_backward(grad_hidden, *((hidden, weight, targets, row_max, sums) if need_weight else ()))
        ctx.weight_dtype, ctx.per_row, ctx.need_weight = weight.dtype, per_row, need_weight
        ctx.settings = (chunk_size, compute_dtype, softcap)
        # The target is the likeliest token where its logit is the row's maximum: the same floats, compared exactly.
        hits = target_logits >= row_max
        ctx.mark_non_differentiable(hits)
        return (losses, hits) if per_row else (losses.sum(), hits.sum())

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor, _grad_hits: Any) -> tuple[Any, ...]:
        grad_hidden, *inputs = ctx.saved_tensors
        scale = grad_output[:, None] if ctx.per_row else grad_output
        grad_weight = None
        if ctx.need_weight:
            hidden, weight, targets, row_max, sums = inputs
            row_weights = grad_output if ctx.per_row else grad_output.expand(hidden.shape[0])
            grad_weight = _weight_grad(hidden, weight, targets, row_max, sums, row_weights,
                                       *ctx.settings).to(ctx.weight_dtype)
        return (None if grad_hidden is None else grad_hidden * scale.to(grad_hidden.dtype), grad_weight,
                None, None, None, None, None)


def _softcapped(logits: torch.Tensor, softcap: float | None) -> torch.Tensor:
    return logits if not softcap else torch.tanh(logits / softcap) * softcap


def _softcap_slope(capped: torch.Tensor, softcap: float | None) -> torch.Tensor | float:
    """d softcap(x) / dx, from the capped value."""
    return 1.0 if not softcap else 1.0 - (capped / softcap) ** 2


def block_logits(h: torch.Tensor, w_block: torch.Tensor, softcap: float | None) -> torch.Tensor:
    """A block's (soft-capped) logits in fp32, rounded first to the matmul's dtype as the plain loss rounds them; the
    server's prompt scoring projects its rows with it too."""
    return _softcapped((h @ w_block.T).float(), softcap)


def _target_logits_in(logits: torch.Tensor, targets: torch.Tensor, start: int) -> torch.Tensor:
    """Each row's target logit where the target lies in the block starting at `start`, else 0; selected without a
    mask's count, which would make a GPU wait once per block."""
    inside = (targets >= start) & (targets < start + logits.shape[1])
    picked = logits.gather(1, torch.where(inside, targets - start, 0)[:, None]).squeeze(1)
    return torch.where(inside, picked, 0.0)


def _online_softmax_pass(h: torch.Tensor, w: torch.Tensor, targets: torch.Tensor, softcap: float | None,
                         need_grad: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One pass over the output layer for a chunk of rows: (losses, row maxima, sums of exp(logit − max), target
    logits, d loss / d h in fp32 — or an empty tensor when not needed)."""
    rows = h.shape[0]
    row_max = torch.full((rows,), -math.inf, dtype=torch.float32, device=h.device)
    sums = torch.zeros(rows, dtype=torch.float32, device=h.device)
    target_logits = torch.zeros_like(sums)
    weighted = torch.zeros(rows, w.shape[1] if need_grad else 0, dtype=torch.float32, device=h.device)
    block = _vocab_block(rows, h.device)
    if w.dtype != h.dtype:
        # A layer stored narrower than the arithmetic (a bf16 base computed in fp32, models/precision.py) is widened a
        # block at a time — all at once, Gemma 3's would be another 0.67 GB — and in blocks of at most 4,096 words:
        # the widened copy of a 10k-word block (27 MB for 100 rows) made a pass 17% slower than an fp32 layer's,
        # one of 4,096 words 3% (2-core Xeon).
        block = min(block, _WIDENED_BLOCK_WORDS)
    for start in range(0, w.shape[0], block):
        w_block = w[start:start + block].to(h.dtype)
        logits = block_logits(h, w_block, softcap)
        target_logits += _target_logits_in(logits, targets, start)
        new_max = torch.maximum(row_max, logits.amax(dim=1))
        rescale = (row_max - new_max).exp_()  # 0 at the first block: nothing summed yet
        slope = _softcap_slope(logits, softcap)
        exps = logits.sub_(new_max[:, None]).exp_()  # the logits are not needed again
        sums.mul_(rescale).add_(exps.sum(dim=1))
        if need_grad:
            weighted.mul_(rescale[:, None]).add_((exps * slope if softcap else exps).to(h.dtype) @ w_block)
        row_max = new_max
    losses = sums.log() + row_max - target_logits
    if need_grad:
        # softmax·slope·W minus the one-hot row's slope·w_y
        target_weights = w[targets].float()
        if softcap:
            target_weights.mul_((1.0 - (target_logits / softcap) ** 2)[:, None])
        weighted.div_(sums[:, None]).sub_(target_weights)
    return losses, row_max, sums, target_logits, weighted


def _weight_grad(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, row_max: torch.Tensor,
                 sums: torch.Tensor, row_weights: torch.Tensor, chunk_size: int, compute_dtype: torch.dtype,
                 softcap: float | None) -> torch.Tensor:
    """sum_i r_i · d CE_i / dW, recomputing each block's logits with the normalisers forward found."""
    grad_weight = torch.zeros_like(weight, dtype=torch.float32)
    for start in range(0, hidden.shape[0], chunk_size):
        rows = slice(start, start + chunk_size)
        h, y, r = hidden[rows].to(compute_dtype), targets[rows], row_weights[rows].float()
        block = _vocab_block(h.shape[0], h.device)
        for word in range(0, weight.shape[0], block):
            logits = block_logits(h, weight[word:word + block].to(compute_dtype), softcap)
            probs = (logits - row_max[rows, None]).exp_().div_(sums[rows, None])
            probs.mul_(_softcap_slope(logits, softcap)).mul_(r[:, None])
            grad_weight[word:word + block] += (probs.to(compute_dtype).T @ h).float()
        target_logits = _softcapped((h.float() * weight[y].float()).sum(-1), softcap)
        target_slope = _softcap_slope(target_logits, softcap)
        grad_weight.index_add_(0, y, -(r * target_slope)[:, None] * h.float())
    return grad_weight


def output_softcap(model: Any) -> float | None:
    """The cap a model puts on its output logits (Gemma 2's cap·tanh(z/cap)), if any; a multimodal checkpoint keeps it
    in its text config."""
    return getattr(model.config.get_text_config(), "final_logit_softcapping", None)


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         chunk_size: int | None = None, compute_dtype: torch.dtype = torch.float32,
                         softcap: float | None = None, per_row: bool = False) -> torch.Tensor:
    """Cross-entropy of `hidden @ weight.T` against `targets`, chunked over rows (by default as suits the device):
    summed, or one value per row."""
    return linear_cross_entropy_and_hits(hidden, weight, targets, chunk_size, compute_dtype, softcap, per_row)[0]


def linear_cross_entropy_and_hits(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                                  chunk_size: int | None = None, compute_dtype: torch.dtype = torch.float32,
                                  softcap: float | None = None, per_row: bool = False
                                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """linear_cross_entropy, and how many rows' target is the likeliest token (or, per row, whether it is): the
    token accuracy that OpenAI's fine-tuning and TRL report, from the same pass."""
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
        softcap = output_softcap(base)
        token_losses = linear_cross_entropy(hidden, base.get_output_embeddings().weight, targets,
                                            compute_dtype=self.compute_dtype, softcap=softcap, per_row=True)
        return -token_losses, states


def logprob_inputs(batch: dict[str, Any]) -> dict[str, Any]:
    """What AnswerLogProbs takes from a tree batch (data/collate.tree_batch)."""
    keys = ("input_ids", "position_ids", "packed_lengths", "sources", "targets", "owners")
    return {**{key: batch[key] for key in keys}, "answers": batch["last"].shape[0]}
