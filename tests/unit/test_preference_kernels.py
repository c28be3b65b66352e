"""The preference losses against values computed by hand, and the tree-shaped pair rows against plain forwards."""

from __future__ import annotations

import math

import pytest
import torch

from shitate.models.logprobs import linear_cross_entropy
from shitate.train.losses import bradley_terry_losses, dpo_losses, orpo_losses


def _log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x))


def test_dpo_and_ipo_by_hand():
    policy_c, policy_r, ref_c, ref_r = torch.tensor([-3.0, -6.0]), torch.tensor([-5.0, -4.0]), torch.tensor([-4.0, -5.0]), torch.tensor([-4.0, -5.0])
    # margins: (−3 + 5) − 0 = 2 and (−6 + 4) − 0 = −2
    sigmoid = dpo_losses(policy_c, policy_r, ref_c, ref_r, beta=0.1)
    assert sigmoid.tolist() == pytest.approx([-_log_sigmoid(0.2), -_log_sigmoid(-0.2)], abs=1e-6)
    ipo = dpo_losses(policy_c, policy_r, ref_c, ref_r, beta=0.25, kind="ipo")
    assert ipo.tolist() == pytest.approx([(2 - 2.0) ** 2, (-2 - 2.0) ** 2])


def test_orpo_by_hand():
    chosen, rejected, weight = -0.5, -1.0, 0.2
    log_odds = (chosen - rejected) - (math.log(1 - math.exp(chosen)) - math.log(1 - math.exp(rejected)))
    expected = -chosen - weight * _log_sigmoid(log_odds)
    assert orpo_losses(torch.tensor([chosen]), torch.tensor([rejected]), weight).item() == pytest.approx(expected, abs=1e-6)
    # Near certainty the odds stay finite (log1p(-exp(x)) would give -inf at x = -1e-9 in fp32).
    assert torch.isfinite(orpo_losses(torch.tensor([-1e-9]), torch.tensor([-2.0]), 0.1)).all()


def test_bradley_terry_by_hand():
    losses = bradley_terry_losses(torch.tensor([1.0, 0.0]), torch.tensor([0.5, 0.0]), margin=0.25)
    assert losses.tolist() == pytest.approx([-_log_sigmoid(0.25), -_log_sigmoid(-0.25)], abs=1e-6)


def test_per_row_cross_entropy_and_its_gradients_match_autograd():
    torch.manual_seed(0)
    hidden = torch.randn(10, 16, requires_grad=True)
    weight = torch.randn(50, 16, requires_grad=True)
    targets = torch.randint(0, 50, (10,))
    row_weights = torch.randn(10)
    per_row = linear_cross_entropy(hidden, weight, targets, chunk_size=4, per_row=True, softcap=30.0)
    (per_row * row_weights).sum().backward()
    got = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    logits = torch.tanh(hidden @ weight.T / 30.0) * 30.0
    plain = torch.nn.functional.cross_entropy(logits, targets, reduction="none")
    (plain * row_weights).sum().backward()
    torch.testing.assert_close(per_row, plain.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[0], hidden.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got[1], weight.grad, rtol=1e-4, atol=1e-5)


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                              reason="no CUDA GPU here"))])
def pair_model(request, tiny_model, tokenizer):
    """The tiny model with packed attention on each device (a GPU runs SDPA where a CPU runs its own short kernel)."""
    from transformers import AutoModelForCausalLM

    from shitate.data.preference import encode_pair
    from shitate.data.templates import get_template
    from shitate.models.attention import use_packed_attention

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval().to(request.param)
    use_packed_attention(model)
    template = get_template("gemma", tokenizer)
    # Answers longer than the tiny model's 16-token sliding window, so the window's rule is exercised too.
    pairs = [{"prompt": "なんで空は青いの?", "chosen": "青い光がいちばん散らばるからだよ。" * 3, "rejected": "しらない。"},
             {"prompt": "海はなぜしょっぱいの?", "chosen": "川が岩の塩を運ぶからだよ。", "rejected": "雨がしょっぱいから。" * 4}]
    examples = [encode_pair(p, tokenizer, template, 256, "子ども向けに答えてね。") for p in pairs]
    return model, examples


def _plain_answer_logps(model, example) -> list[float]:
    """Each answer's summed log-probability from an ordinary forward over prompt + answer."""
    prompt, chosen, rejected = example["branches"]
    ids, labels = example["input_ids"], example["labels"]
    values = []
    for start, length in ((prompt, chosen), (prompt + chosen, rejected)):
        sequence = ids[:prompt] + ids[start:start + length]
        answer_labels = [-100] * prompt + labels[start:start + length]
        with torch.no_grad():
            logits = model(torch.tensor([sequence], device=model.device)).logits[0, :-1].float()
        logps = logits.log_softmax(-1)
        values.append(sum(logps[i, t].item() for i, t in enumerate(answer_labels[1:]) if t != -100))
    return values


def test_tree_rows_give_each_answer_the_log_probability_of_a_plain_forward(pair_model, tokenizer):
    from shitate.data.collate import tree_batch
    from shitate.models.logprobs import AnswerLogProbs, logprob_inputs

    model, examples = pair_model
    batch = tree_batch(examples, capacity=4096, pad_id=tokenizer.pad_token_id, device=model.device)
    assert len(batch["packed_lengths"]) == 1  # both pairs share one row
    with torch.no_grad():
        logps, counts = AnswerLogProbs(model)(**logprob_inputs(batch))
    expected = [value for example in examples for value in _plain_answer_logps(model, example)]
    torch.testing.assert_close(logps.cpu(), torch.tensor(expected), rtol=0, atol=1e-4)
    assert counts.tolist() == [sum(1 for t in e["labels"][a:a + n] if t != -100)
                               for e in examples for a, n in ((e["branches"][0], e["branches"][1]),
                                                              (sum(e["branches"][:2]), e["branches"][2]))]


def test_dpo_loss_on_a_batch_matches_the_formula(pair_model, tokenizer):
    from shitate.data.collate import tree_batch
    from shitate.models.logprobs import AnswerLogProbs
    from shitate.train.preference import DPOLoss

    model, examples = pair_model
    reference = [[-40.0, -35.5], [-20.25, -60.0]]
    for example, values in zip(examples, reference):
        example["reference"] = values
    batch = tree_batch(examples, capacity=4096, pad_id=tokenizer.pad_token_id, device=model.device)
    with torch.no_grad():
        total, pairs, stats = DPOLoss(AnswerLogProbs(model), beta=0.1)(**batch)
    expected = 0.0
    for example, (ref_c, ref_r) in zip(examples, reference):
        chosen, rejected = _plain_answer_logps(model, example)
        expected += -_log_sigmoid(0.1 * ((chosen - rejected) - (ref_c - ref_r)))
    assert pairs == 2 and total.item() == pytest.approx(expected, abs=1e-5)
