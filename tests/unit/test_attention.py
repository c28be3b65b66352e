import pytest
import torch
import torch.nn.functional as F

from shitate.models.attention import SHORT, _example_attention


def _reference(q, k, v, sliding_window, scale=0.125):
    length = q.shape[2]
    i = torch.arange(length)
    distance = i[:, None] - i[None, :]
    allowed = (distance >= 0) & (distance < (sliding_window or length + 1))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=scale, enable_gqa=True)


@pytest.mark.parametrize("length, sliding_window", [(9, None), (40, 16), (SHORT + 3, 100)])
def test_example_attention_matches_sdpa_forward_and_backward(length, sliding_window):
    # GQA as in Gemma 3 (4 query heads share one key/value head); the last case takes SDPA's path.
    torch.manual_seed(0)
    q = torch.randn(1, 4, length, 64, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, 1, length, 64, dtype=torch.float64, requires_grad=True)
    v = torch.randn(1, 1, length, 64, dtype=torch.float64, requires_grad=True)
    grad_out = torch.randn(1, 4, length, 64, dtype=torch.float64)
    expected = _reference(q, k, v, sliding_window)
    expected_grads = torch.autograd.grad(expected, (q, k, v), grad_out)
    got = _example_attention(q, k, v, dropout=0.0, scaling=0.125, sliding_window=sliding_window)
    grads = torch.autograd.grad(got, (q, k, v), grad_out)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    for mine, theirs in zip(grads, expected_grads):
        torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-6)


def test_short_attention_in_bf16_is_as_close_to_exact_as_sdpa():
    torch.manual_seed(1)
    q, k, v = (torch.randn(1, h, 70, 256, dtype=torch.bfloat16, requires_grad=True) for h in (4, 1, 1))
    exact = _reference(q.double(), k.double(), v.double(), None, scale=256**-0.5)
    sdpa = _reference(q, k, v, None, scale=256**-0.5)
    ours = _example_attention(q, k, v, dropout=0.0, scaling=256**-0.5, sliding_window=None)
    # No further from the exact result than torch's own bf16 kernel (both ~0.009 here).
    assert (ours.double() - exact).abs().max() <= 1.1 * (sdpa.double() - exact).abs().max()
