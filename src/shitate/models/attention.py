"""Attention that respects packed examples: each example attends only to itself.

Registered with transformers' attention interface, so any model that routes attention
through it (Gemma 3, Llama, Qwen, …) gets it. Without packing information it is plain SDPA,
so the same model can still validate or generate on padded batches. An example may also be a
tree (a shared prompt, then branches that each see the prompt and themselves): preference
pairs are encoded that way, so their prompt is computed once for both answers. We loop over examples
instead of building one block-diagonal mask because a row's examples then cost what they
would cost alone (no attention over the whole row, no row-sized mask).

That loop is for CPUs. A GPU pays a kernel launch per call, and 8 short examples × 18 layers × forward and
backward left an H100 waiting on Python: there the whole batch is one SDPA call under a mask that allows
exactly what the loop computes (same example, same branch or its prefix, causal, within the window), built
once per batch and shared by the layers.

Chat examples are short, and for short sequences torch's CPU flash-attention kernel is slow:
forward and backward of one 65-token Gemma 3 example take 1.7 ms against 0.7 ms for plain
matmuls and a softmax. On a CPU, examples up to SHORT tokens take that plain path, with the scores in
fp32 as flash attention keeps them; longer ones keep SDPA, whose memory does not grow as L².
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

NAME = "shitate_packed"
SHORT = 256  # up to here the plain path is faster (2.5× at 65 tokens, 1.5× at 256) and its L² is small


class _ShortAttention(torch.autograd.Function):
    """softmax(q kᵀ · scale, masked) v for one example, heads grouped as (kv head, group, L, D)."""

    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor,
                scale: float) -> torch.Tensor:
        scores = (q.float() @ k.float().transpose(-1, -2)).mul_(scale).masked_fill_(~allowed, float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        ctx.save_for_backward(q, k, v, probs)
        ctx.scale = scale
        return probs.to(v.dtype) @ v

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[Any, ...]:
        q, k, v, probs = ctx.saved_tensors
        grad_out = grad_out.to(v.dtype)
        # As flash attention does: matmuls in the inputs' dtype, the softmax gradient in fp32.
        grad_v = (probs.to(v.dtype).transpose(-1, -2) @ grad_out).sum(2, keepdim=True)
        grad_probs = (grad_out @ v.transpose(-1, -2)).float()
        grad_scores = probs.mul(grad_probs - (grad_probs * probs).sum(-1, keepdim=True)).mul_(ctx.scale).to(q.dtype)
        grad_q = grad_scores @ k
        grad_k = (grad_scores.transpose(-1, -2) @ q).sum(2, keepdim=True)
        return grad_q, grad_k, grad_v, None, None


def _allowed(length: int, sliding_window: int | None, device: torch.device) -> torch.Tensor:
    """Which key each query may see: causal, and within the layer's sliding window (transformers' rule)."""
    i = torch.arange(length, device=device)
    distance = i[:, None] - i[None, :]
    allowed = distance >= 0
    if sliding_window is not None:
        allowed &= distance < sliding_window
    return allowed


def _example_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout: float, scaling: float | None,
                       sliding_window: int | None) -> torch.Tensor:
    """Attention of one example (1, heads, L, D) against itself."""
    length, heads, kv_heads = q.shape[2], q.shape[1], k.shape[1]
    scale = scaling if scaling is not None else q.shape[-1] ** -0.5
    if q.device.type == "cpu" and length <= SHORT and dropout == 0.0:  # GPUs' SDPA kernels are fast at any length
        grouped = q.reshape(1, kv_heads, heads // kv_heads, length, q.shape[-1])
        out = _ShortAttention.apply(grouped, k.unsqueeze(2), v.unsqueeze(2),
                                    _allowed(length, sliding_window, q.device), scale)
        return out.reshape(1, heads, length, q.shape[-1])
    mask = None
    if sliding_window is not None and length > sliding_window:
        mask = _allowed(length, sliding_window, q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=mask is None,
                                          scale=scale, enable_gqa=heads != kv_heads)


def _branch_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, shared: int, dropout: float,
                      scaling: float | None, sliding_window: int | None) -> torch.Tensor:
    """Attention of a later branch's queries (1, heads, B, D) over the shared prefix and the branch itself.

    `k` and `v` are the prefix's keys and values followed by the branch's; positions continue
    from the prefix, so the branch sees what it would see written right after the prefix.
    """
    branch, heads, kv_heads = q.shape[2], q.shape[1], k.shape[1]
    scale = scaling if scaling is not None else q.shape[-1] ** -0.5
    query_positions = torch.arange(shared, shared + branch, device=q.device)
    key_positions = torch.cat([torch.arange(shared, device=q.device), query_positions])
    distance = query_positions[:, None] - key_positions[None, :]
    allowed = distance >= 0
    if sliding_window is not None:
        allowed &= distance < sliding_window
    if q.device.type == "cpu" and k.shape[2] <= SHORT and dropout == 0.0:
        grouped = q.reshape(1, kv_heads, heads // kv_heads, branch, q.shape[-1])
        out = _ShortAttention.apply(grouped, k.unsqueeze(2), v.unsqueeze(2), allowed, scale)
        return out.reshape(1, heads, branch, q.shape[-1])
    return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=dropout, scale=scale,
                                          enable_gqa=heads != kv_heads)


def _tree_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tree: tuple[int, ...], dropout: float,
                    scaling: float | None, sliding_window: int | None) -> torch.Tensor:
    """A shared prefix followed by branches that each see the prefix and themselves, not each other.

    `tree` is (prefix, branch 1, branch 2, …) in tokens: a preference pair is (prompt, chosen,
    rejected), so the prompt is computed once for both answers. The prefix and the first branch
    are one plain causal sequence; each later branch attends to the prefix's keys and its own.
    """
    shared, first = tree[0], tree[1]
    pieces = [_example_attention(q[:, :, :shared + first], k[:, :, :shared + first], v[:, :, :shared + first],
                                 dropout, scaling, sliding_window)]
    start = shared + first
    for branch in tree[2:]:
        end = start + branch
        keys = torch.cat([k[:, :, :shared], k[:, :, start:end]], dim=2)
        values = torch.cat([v[:, :, :shared], v[:, :, start:end]], dim=2)
        pieces.append(_branch_attention(q[:, :, start:end], keys, values, shared, dropout, scaling, sliding_window))
        start = end
    return torch.cat(pieces, dim=2)


MASK_ELEMENTS = 2**26  # a batch mask of up to 64 MB; longer rows keep the per-example loop (its memory grows as L)


def use_one_masked_call(device: torch.device, rows: int, width: int) -> bool:
    """Whether a batch's attention is one masked SDPA call (GPUs, rows short enough for a dense mask) rather than
    a call per example (CPUs)."""
    return device.type != "cpu" and rows * width * width <= MASK_ELEMENTS


def _token_layout(packed_lengths: list[list[Any]], width: int) -> tuple[torch.Tensor, ...]:
    """Per token of each row: which example, which branch (0: an example's prefix or a plain example), position."""
    example_ids, branch_ids, positions = (torch.zeros(len(packed_lengths), width, dtype=torch.long) for _ in range(3))
    for row, lengths in enumerate(packed_lengths):
        start = 0
        for number, length in enumerate(lengths):
            parts = length if isinstance(length, tuple) else (length,)
            example_ids[row, start:start + sum(parts)] = number
            offset = start
            for branch, size in enumerate(parts):
                branch_ids[row, offset:offset + size] = branch
                # Branches continue the prefix's positions (what _branch_attention's distances assume).
                first = 0 if branch == 0 else parts[0]
                positions[row, offset:offset + size] = torch.arange(first, first + size)
                offset += size
            start += sum(parts)
        example_ids[row, start:] = len(lengths)  # beyond the row's examples: attends only to itself
        positions[row, start:] = torch.arange(width - start)
    return example_ids, branch_ids, positions


_last_batch: dict[str, Any] = {"batch": None, "masks": {}}  # its masks by sliding window


def _batch_mask(packed_lengths: list[list[Any]], width: int, sliding_window: int | None,
                device: torch.device) -> torch.Tensor:
    """(rows, 1, width, width): which key each query may see, as the per-example loop computes it.

    Every layer of a forward asks for the same masks (one per sliding window), so the last batch's are kept.
    """
    batch = (repr(packed_lengths), width, str(device))
    if _last_batch["batch"] != batch:
        _last_batch.update(batch=batch, masks={})
    masks = _last_batch["masks"]
    if sliding_window not in masks:
        example_ids, branch_ids, positions = _token_layout(packed_lengths, width)
        same_example = example_ids[:, :, None] == example_ids[:, None, :]
        visible_branch = (branch_ids[:, None, :] == 0) | (branch_ids[:, :, None] == branch_ids[:, None, :])
        distance = positions[:, :, None] - positions[:, None, :]
        allowed = same_example & visible_branch & (distance >= 0)
        if sliding_window is not None:
            allowed &= distance < sliding_window
        masks[sliding_window] = allowed[:, None].to(device)
    return masks[sliding_window]


def _masked_batch_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                            packed_lengths: list[list[Any]], dropout: float, scaling: float | None,
                            sliding_window: int | None) -> torch.Tensor:
    heads, kv_heads = query.shape[1], key.shape[1]
    if heads != kv_heads:  # torch's memory-efficient kernel, the one that takes a mask, wants every head's keys
        key, value = (t.repeat_interleave(heads // kv_heads, dim=1) for t in (key, value))
    mask = _batch_mask(packed_lengths, query.shape[2], sliding_window, query.device)
    return F.scaled_dot_product_attention(query, key, value, attn_mask=mask, dropout_p=dropout, scale=scaling)


def packed_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: Any, dropout: float = 0.0, scaling: float | None = None,
                     sliding_window: int | None = None, packed_lengths: list[list[int]] | None = None,
                     **kwargs: Any) -> tuple[torch.Tensor, None]:
    """SDPA per packed example (causal, with the layer's sliding window); plain SDPA otherwise.

    An entry of `packed_lengths` is an example's length, or a tuple (prefix, branch, branch, …)
    for a tree-shaped example such as a preference pair (`_tree_attention`).
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if kwargs.get("softcap"):
        return _softcapped_attention(module, query, key, value, attention_mask, dropout, scaling, sliding_window,
                                     packed_lengths, **kwargs)
    if packed_lengths is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      sliding_window=sliding_window, **kwargs)
    if use_one_masked_call(query.device, query.shape[0], query.shape[2]):
        out = _masked_batch_attention(query, key, value, packed_lengths, dropout, scaling, sliding_window)
        return out.transpose(1, 2).contiguous(), None
    rows = []
    for row, lengths in enumerate(packed_lengths):
        pieces, start = [], 0
        for length in lengths:
            size = sum(length) if isinstance(length, tuple) else length
            q, k, v = (t[row:row + 1, :, start:start + size] for t in (query, key, value))
            if isinstance(length, tuple):
                pieces.append(_tree_attention(q, k, v, length, dropout, scaling, sliding_window))
            else:
                pieces.append(_example_attention(q, k, v, dropout, scaling, sliding_window))
            start += size
        rows.append(torch.cat(pieces, dim=2))
    return torch.cat(rows, dim=0).transpose(1, 2).contiguous(), None


def use_packed_attention(model: Any) -> None:
    """Switch a loaded model to packed-aware attention (padded batches still work)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(NAME, packed_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)
    model.set_attn_implementation(NAME)


def use_plain_attention(model: Any) -> None:
    """Switch back to what a saved model loads with: SDPA, or eager attention for a model that cannot use SDPA
    (Gemma 2, whose scores are soft-capped; transformers refuses SDPA for it)."""
    try:
        model.set_attn_implementation("sdpa")
    except ValueError:
        model.set_attn_implementation("eager")


def _softcapped_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                          attention_mask: Any, dropout: float, scaling: float | None, sliding_window: int | None,
                          packed_lengths: list[list[Any]] | None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """Attention whose scores are soft-capped (Gemma 2: cap·tanh(s/cap)), which no SDPA kernel computes: the model's
    own eager attention, under a mask that allows what the packed path computes (each example, or tree branch, only
    itself), or under the batch's own mask. Its scores take memory as the whole row squared, as eager attention's do.
    """
    import sys

    eager = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
    if eager is None:
        from shitate.errors import ModelError

        raise ModelError(f"{type(module).__name__} soft-caps its attention scores and its module has no eager "
                         "attention to compute them with; this model family cannot be trained here.")
    if packed_lengths is not None:
        allowed = _batch_mask(packed_lengths, query.shape[2], sliding_window, query.device)
    elif attention_mask is None:  # transformers left out a plain causal mask, as SDPA needs none
        allowed = _causal_mask(query.shape[2], key.shape[2], sliding_window, query.device)
    elif attention_mask.dtype == torch.bool:
        allowed = attention_mask
    else:
        return eager(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)[0], None
    # The dtype's lowest number, not -inf, as transformers' own additive masks: a query that may see nothing (a
    # padding position past a sliding window's reach) then averages its keys instead of turning every later layer NaN.
    lowest = torch.finfo(query.dtype).min
    additive = torch.zeros(allowed.shape, dtype=query.dtype, device=query.device).masked_fill_(~allowed, lowest)
    return eager(module, query, key, value, additive, dropout=dropout, scaling=scaling, **kwargs)[0], None


def _causal_mask(queries: int, keys: int, sliding_window: int | None, device: torch.device) -> torch.Tensor:
    """(1, 1, queries, keys): the last `queries` positions of `keys` see themselves and what precedes them."""
    distance = (torch.arange(queries, device=device)[:, None] + keys - queries) - torch.arange(keys, device=device)
    allowed = distance >= 0
    if sliding_window is not None:
        allowed &= distance < sliding_window
    return allowed[None, None]


def use_soft_capped_paged_attention(model: Any) -> None:
    """Let transformers' continuous batcher (`shitate serve`) soft-cap a model's attention scores as its own eager
    attention does: the batcher runs Gemma 2 through its paged eager attention, which leaves the cap out, and the
    served answers differed from `shitate chat`'s. A model without the cap is untouched."""
    if not getattr(model.config.get_text_config(), "attn_logit_softcapping", None):
        return
    from transformers import AttentionInterface

    AttentionInterface.register("paged|eager", _soft_capped_paged_eager)


def _soft_capped_paged_eager(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                             attention_mask: torch.Tensor | None, scaling: float, softcap: float | None = None,
                             **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' paged eager attention with Gemma 2's cap·tanh(s/cap) on the scores before the mask."""
    from transformers.integrations.eager_paged import eager_paged_attention_forward

    if not softcap:
        return eager_paged_attention_forward(module, query, key, value, attention_mask, scaling=scaling, **kwargs)
    groups = getattr(module, "num_key_value_groups", 1)
    key, value = (t.repeat_interleave(groups, dim=1) for t in (key, value))
    scores = torch.tanh(torch.matmul(query, key.transpose(2, 3)) * scaling / softcap) * softcap
    if attention_mask is not None:
        scores = scores + attention_mask
    weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), weights
