from shitate.models import load


def test_auto_precision_follows_the_hardware(monkeypatch):
    monkeypatch.setattr(load, "bf16_supported", lambda device: True)
    assert load.pick_precision("auto", "cpu") == "bf16"
    monkeypatch.setattr(load, "bf16_supported", lambda device: False)
    assert load.pick_precision("auto", "cpu") == "fp32"
    assert load.pick_precision("bf16", "cpu") == "bf16"  # an explicit choice is kept


def test_a_hub_id_without_network_fails_fast_with_a_reason(monkeypatch):
    import socket

    import pytest

    from shitate.errors import ModelError

    def no_network(*args, **kwargs):
        raise OSError("Name or service not known")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(socket, "create_connection", no_network)
    with pytest.raises(ModelError, match="the hub cannot be reached from here"):
        load.resolve("google/gemma-3-270m")


def test_the_output_layer_gets_a_contiguous_input_when_a_batch_is_generated(tiny_model, tokenizer):
    # generate() hands the output layer the last position of a left-padded batch, a strided slice; torch's CPU
    # linear then copies the weight once per row (18 s and 2.7 GB for the default model's vocabulary and 16 rows).
    import torch

    model = load.load_model(load.resolve(str(tiny_model), progress=False), dtype=torch.bfloat16)
    seen: list[bool] = []
    model.get_output_embeddings().register_forward_pre_hook(lambda _, args: seen.append(args[0].is_contiguous()))
    ids = torch.tensor([[0, 0, 5, 6, 7], [5, 6, 7, 8, 9]])
    model.generate(input_ids=ids, attention_mask=(ids != 0).long(), max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert len(seen) == 3 and all(seen)
