import pytest
import torch

from conftest import kids_records
from shitate.data.collate import best_fit_decreasing, pack_batch, pad_batch, split_by_tokens
from shitate.data.templates import encode_chat, get_template
from shitate.models.attention import use_packed_attention
from shitate.train.losses import AnswerLoss


def test_best_fit_decreasing_fills_rows_tightly():
    rows = best_fit_decreasing([5, 3, 7, 2, 3, 6], capacity=10)
    # 7 opens a row, 6 and 5 open rows, each 3 goes to the fullest row it fits, 2 to the only one left
    assert rows == [[2, 1], [5, 4], [0, 3]]


def test_pack_batch_layout():
    examples = [{"input_ids": [1, 2, 3], "labels": [-100, 2, 3]}, {"input_ids": [4, 5], "labels": [-100, 5]}]
    batch = pack_batch(examples, capacity=8, pad_id=0, device="cpu")
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, 5]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1]]
    assert batch["labels"].tolist() == [[-100, 2, 3, -100, 5]]
    assert batch["packed_lengths"] == [[3, 2]]
    two_rows = pack_batch(examples, capacity=3, pad_id=0, device="cpu")
    assert two_rows["input_ids"].tolist() == [[1, 2, 3], [4, 5, 0]] and two_rows["packed_lengths"] == [[3], [2, 1]]


@pytest.fixture(scope="module")
def packed_model(tiny_model):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    use_packed_attention(model)
    return model


def examples(tokenizer, count):
    template = get_template("gemma", tokenizer)
    return [encode_chat(r["messages"], tokenizer, template, 512) for r in kids_records(count)]


def test_packed_examples_see_only_themselves(packed_model, tokenizer):
    """Each packed example's hidden states equal those of the example run alone (sliding window 16 included)."""
    batch = examples(tokenizer, 5)
    assert max(len(e["input_ids"]) for e in batch) > packed_model.config.sliding_window
    packed = pack_batch(batch, capacity=4096, pad_id=0, device="cpu")
    layer_types = set(packed_model.config.layer_types)
    with torch.no_grad():
        hidden = packed_model.get_decoder()(input_ids=packed["input_ids"], position_ids=packed["position_ids"],
                                            attention_mask={t: None for t in layer_types},
                                            packed_lengths=packed["packed_lengths"]).last_hidden_state[0]
        order = best_fit_decreasing([len(e["input_ids"]) for e in batch], 4096)[0]
        start = 0
        for i in order:
            n = len(batch[i]["input_ids"])
            alone = packed_model.get_decoder()(input_ids=torch.tensor([batch[i]["input_ids"]])).last_hidden_state[0]
            torch.testing.assert_close(hidden[start:start + n], alone, rtol=1e-4, atol=1e-4)
            start += n


def test_packed_loss_equals_padded_loss(packed_model, tokenizer):
    batch = examples(tokenizer, 8)
    loss = AnswerLoss(packed_model)
    with torch.no_grad():
        packed_total, packed_count, packed_stats = loss(**pack_batch(batch, 100, 0, "cpu"))  # rows with padding tails
        padded_total, padded_count, padded_stats = loss(**pad_batch(batch, 0, "cpu"))
    assert packed_count == padded_count and packed_stats == padded_stats
    torch.testing.assert_close(packed_total / packed_count, padded_total / padded_count, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3", "gemma2", "gpt_neox", "gpt2"])
def test_packed_loss_equals_padded_loss_in_other_families(tmp_path, tokenizer, family):
    """Packed examples keep to themselves in each family (sliding windows, soft-capped scores, fused projections
    included): an example that saw its neighbours in the row would change the loss. (Without the packed attention,
    Qwen2 and Gemma 2 fail here; transformers' own masks keep the others apart from the restarting positions.)"""
    from transformers import AutoModelForCausalLM

    from tiny_families import build_tiny

    model = AutoModelForCausalLM.from_pretrained(build_tiny(family, tmp_path, tokenizer), dtype=torch.float32).eval()
    use_packed_attention(model)
    batch = examples(tokenizer, 8)
    with torch.no_grad():
        packed_total, packed_count, _ = AnswerLoss(model)(**pack_batch(batch, 4096, 0, "cpu"))  # one row of 8
        padded_total, padded_count, _ = AnswerLoss(model)(**pad_batch(batch, 0, "cpu"))
    assert packed_count == padded_count
    torch.testing.assert_close(packed_total / packed_count, padded_total / padded_count, rtol=1e-5, atol=1e-5)


def test_split_by_tokens_keeps_order_and_budget():
    examples = [{"input_ids": [0] * n, "labels": [0] * n} for n in (10, 30, 20, 50, 5)]
    groups = split_by_tokens(examples, 60)
    assert [[len(e["input_ids"]) for e in g] for g in groups] == [[10, 30], [20], [50], [5]]
    assert split_by_tokens(examples[:1], 4) == [examples[:1]]  # an example longer than the budget still trains


def test_packed_split_evens_out_the_groups():
    examples = [{"input_ids": [0] * 65, "labels": [0] * 65} for _ in range(8)]  # 520 tokens
    sizes = [sum(len(e["input_ids"]) for e in g) for g in split_by_tokens(examples, 256, packed=True)]
    assert sizes == [195, 195, 130]  # three groups, as 520/256 needs; not 195 + 195 + 65 + 65
    sizes = [sum(len(e["input_ids"]) for e in g) for g in split_by_tokens(examples, 300, packed=True)]
    assert sizes == [260, 260]
