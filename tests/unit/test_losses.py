import pytest
import torch
import torch.nn.functional as F

from shitate.data.templates import IGNORE_INDEX
from shitate.models.logprobs import linear_cross_entropy
from shitate.train.losses import AnswerLoss


@pytest.mark.parametrize("softcap", [None, 3.0])
def test_chunked_linear_cross_entropy_matches_full_logits(softcap):
    torch.manual_seed(0)
    hidden = torch.randn(37, 16, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(50, 16, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 50, (37,))
    logits = hidden @ weight.T
    if softcap:
        logits = softcap * torch.tanh(logits / softcap)
    expected = F.cross_entropy(logits, targets, reduction="sum")
    expected_grads = torch.autograd.grad(expected * 0.5, [hidden, weight])
    loss = linear_cross_entropy(hidden, weight, targets, chunk_size=8, compute_dtype=torch.float64, softcap=softcap)
    grads = torch.autograd.grad(loss * 0.5, [hidden, weight])
    torch.testing.assert_close(loss, expected.float(), rtol=1e-6, atol=1e-6)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)  # logits are kept in fp32


def test_answer_loss_equals_the_models_own_loss_and_gradients(tiny_model):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    torch.manual_seed(1)
    input_ids = torch.randint(5, 600, (3, 24))
    with torch.no_grad():  # a greedy stretch, so that some answer tokens are the model's first choice
        for t in range(13, 17):
            input_ids[:, t + 1] = model(input_ids=input_ids[:, :t + 1]).logits[:, -1].argmax(-1)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[2, 18:] = 0  # a padded row
    labels = input_ids.clone()
    labels[:, :10] = IGNORE_INDEX  # the prompt part
    labels[attention_mask == 0] = IGNORE_INDEX

    reference = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
    reference_grads = torch.autograd.grad(reference, list(model.parameters()))
    total, count, stats = AnswerLoss(model, chunk_size=7)(input_ids=input_ids, attention_mask=attention_mask,
                                                          labels=labels)
    ours = total / count
    grads = torch.autograd.grad(ours, list(model.parameters()))
    torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-4)
    for got, want in zip(grads, reference_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    # Token accuracy: the answer tokens the model ranks first, as argmax over the full logits counts them.
    with torch.no_grad():
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1]
    targets = labels[:, 1:]
    answered = targets != IGNORE_INDEX
    expected = (logits.argmax(-1) == targets)[answered].sum()
    assert 0 < int(expected) < int(count)  # a random tiny model gets some right: the check can tell them apart
    assert int(stats["token_accuracy"]) == int(expected)


def test_vocabulary_blocks_give_the_same_loss_and_gradients(monkeypatch):
    # Blocks of 16 words over a 50-word vocabulary: targets fall in every block, the last one short.
    from shitate.models import logprobs as losses

    torch.manual_seed(2)
    hidden = torch.randn(21, 16, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(50, 16, dtype=torch.float64, requires_grad=True)
    targets = torch.tensor([0, 15, 16, 31, 32, 47, 48, 49] + list(range(3, 42, 3)))
    whole = linear_cross_entropy(hidden, weight, targets, chunk_size=8, compute_dtype=torch.float64, softcap=2.0)
    whole_grads = torch.autograd.grad(whole, [hidden, weight])
    monkeypatch.setattr(losses, "_vocab_block", lambda rows, device: 16)
    sliced = linear_cross_entropy(hidden, weight, targets, chunk_size=8, compute_dtype=torch.float64, softcap=2.0)
    sliced_grads = torch.autograd.grad(sliced, [hidden, weight])
    torch.testing.assert_close(sliced, whole)
    for got, want in zip(sliced_grads, whole_grads):
        torch.testing.assert_close(got, want)


def test_bf16_loss_is_the_fp32_loss_of_bf16_logits():
    # What autocast gives the plain loss: bf16 logits, cross-entropy taken in fp32.
    torch.manual_seed(3)
    hidden = torch.randn(30, 64, dtype=torch.bfloat16, requires_grad=True)
    weight = (torch.randn(3000, 64) * 0.3).to(torch.bfloat16)
    targets = torch.randint(0, 3000, (30,))
    expected = F.cross_entropy((hidden @ weight.T).float(), targets, reduction="sum")
    (expected_grad,) = torch.autograd.grad(expected, [hidden])
    loss = linear_cross_entropy(hidden, weight, targets, chunk_size=8, compute_dtype=torch.bfloat16)
    (grad,) = torch.autograd.grad(loss, [hidden])
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-4)
    torch.testing.assert_close(grad.float(), expected_grad.float(), rtol=0.02, atol=0.01)
