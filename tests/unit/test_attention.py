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


@pytest.mark.parametrize("sliding_window", [None, 5])
def test_one_masked_call_computes_what_the_per_example_loop_computes(monkeypatch, sliding_window):
    # What a GPU runs (one SDPA call under a batch mask) against what a CPU runs, on the same packed rows: plain
    # examples, a tree (prefix 4, branches 3 and 5), a padding tail; GQA with 4 query heads on 1 key/value head.
    from shitate.models import attention

    packed_lengths = [[6, (4, 3, 5), 2], [9, 3, 8]]
    torch.manual_seed(2)
    q = torch.randn(2, 4, 20, 16, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 1, 20, 16, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, 1, 20, 16, dtype=torch.float64, requires_grad=True)
    grad_out = torch.randn(2, 20, 4, 16, dtype=torch.float64)
    module = torch.nn.Module()

    def run():
        out, _ = attention.packed_attention(module, q, k, v, None, scaling=0.25, sliding_window=sliding_window,
                                            packed_lengths=packed_lengths)
        return out, torch.autograd.grad(out, (q, k, v), grad_out)

    monkeypatch.setattr(attention, "use_one_masked_call", lambda *args: False)
    loop, loop_grads = run()
    monkeypatch.setattr(attention, "use_one_masked_call", lambda *args: True)
    masked, masked_grads = run()
    # To fp32's precision: the CPU's short kernel computes its scores in fp32 (a wrong mask errs by ~1).
    torch.testing.assert_close(masked, loop, rtol=1e-5, atol=1e-6)
    for mine, theirs in zip(masked_grads, loop_grads):
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-6)


def test_a_gpu_batch_takes_one_masked_call_only_while_its_mask_is_small():
    from shitate.models.attention import use_one_masked_call

    gpu = torch.device("cuda")
    assert use_one_masked_call(gpu, rows=8, width=256)
    assert not use_one_masked_call(gpu, rows=8, width=4096)  # a 128 MB mask: the per-example loop instead
    assert not use_one_masked_call(torch.device("cpu"), rows=8, width=256)


def test_soft_capped_attention_packed_or_padded_matches_transformers_eager_gemma2(tmp_path, tokenizer):
    # Gemma 2 (gemma-2-2b-jpn-it) soft-caps its scores, which neither SDPA nor the packed loop computed: training
    # stopped on its first step. Reference: transformers' own eager Gemma 2 on a padded batch. The batch's lengths
    # differ by more than the 16-token sliding window, so a padding query sees no key: with a -inf mask that turned
    # every later layer NaN.
    from transformers import AutoModelForCausalLM

    from conftest import kids_records
    from shitate.data.collate import pack_batch, pad_batch
    from shitate.data.templates import encode_chat, get_template
    from shitate.models.attention import use_packed_attention
    from shitate.train.losses import AnswerLoss
    from tiny_families import build_tiny

    folder = build_tiny("gemma2", tmp_path / "gemma2", tokenizer)
    eager = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager").eval()
    packed = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    use_packed_attention(packed)
    template = get_template("gemma", tokenizer)
    batch = [encode_chat(r["messages"], tokenizer, template, 512) for r in kids_records(8)]
    lengths = [len(e["input_ids"]) for e in batch]
    assert max(lengths) - min(lengths) > packed.config.sliding_window

    with torch.no_grad():
        expected, count, _ = AnswerLoss(eager)(**pad_batch(batch, 0, "cpu"))
        for model_batch in (pack_batch(batch, 100, 0, "cpu"), pad_batch(batch, 0, "cpu")):
            got, got_count, _ = AnswerLoss(packed)(**model_batch)
            assert got_count == count
            torch.testing.assert_close(got / got_count, expected / count, rtol=1e-5, atol=1e-5)
        capped = AnswerLoss(packed)(**pack_batch(batch, 100, 0, "cpu"))[0]
    packed.config.attn_logit_softcapping = None  # the cap matters here: without it the loss differs
    for layer in packed.model.layers:
        layer.self_attn.attn_logit_softcapping = None
    with torch.no_grad():
        uncapped = AnswerLoss(packed)(**pack_batch(batch, 100, 0, "cpu"))[0]
    assert abs(float(uncapped - capped)) > 1e-3 * float(capped)  # a hundred times the tolerance above
