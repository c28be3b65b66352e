"""Attention that respects packed examples: each example attends only to itself.

Registered with transformers' attention interface, so any model that routes attention
through it (Gemma 3, Llama, Qwen, …) gets it. Without packing information it is plain SDPA,
so the same model can still validate or generate on padded batches. We loop over examples
instead of building one block-diagonal mask because a row's examples then cost what they
would cost alone (no attention over the whole row, no row-sized mask).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

NAME = "shitate_packed"


def packed_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: Any, dropout: float = 0.0, scaling: float | None = None,
                     sliding_window: int | None = None, packed_lengths: list[list[int]] | None = None,
                     **kwargs: Any) -> tuple[torch.Tensor, None]:
    """SDPA per packed example (causal, with the layer's sliding window); plain SDPA otherwise."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if packed_lengths is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      sliding_window=sliding_window, **kwargs)
    if getattr(module, "attn_logit_softcapping", None):
        raise ValueError("packed attention does not support attention logit soft-capping; set train.packing: false")
    rows = []
    for row, lengths in enumerate(packed_lengths):
        pieces, start = [], 0
        for length in lengths:
            q, k, v = (t[row:row + 1, :, start:start + length] for t in (query, key, value))
            mask = None
            if sliding_window is not None and length > sliding_window:
                i = torch.arange(length, device=query.device)
                distance = i[:, None] - i[None, :]
                mask = (distance >= 0) & (distance < sliding_window)  # transformers' sliding-window rule
            pieces.append(F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout,
                                                         is_causal=mask is None, scale=scaling,
                                                         enable_gqa=q.shape[1] != k.shape[1]))
            start += length
        rows.append(torch.cat(pieces, dim=2))
    return torch.cat(rows, dim=0).transpose(1, 2).contiguous(), None


def use_packed_attention(model: torch.nn.Module) -> None:
    """Switch a loaded model to packed-aware attention (padded batches still work)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(NAME, packed_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)
    model.set_attn_implementation(NAME)
