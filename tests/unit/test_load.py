from pathlib import Path

from shitate.models import load


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


def test_a_run_adapter_is_merged_in_fp32_one_layer_at_a_time(tmp_path, tiny_model):
    """The same bf16 weights as loading the whole base in fp32, merging and casting, without that fp32 copy."""
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    from shitate.models.load import ModelSource, load_model

    base = tmp_path / "base"  # bf16 on disk, as the default model's cache is
    AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.bfloat16).save_pretrained(base)
    torch.manual_seed(0)
    tuned = get_peft_model(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32),
                           LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    for name, parameter in tuned.named_parameters():
        if "lora_B" in name:  # a fresh adapter's B is zero: give it a delta to merge
            torch.nn.init.normal_(parameter, std=1e-3)
    tuned.save_pretrained(tmp_path / "adapter")

    merged = load_model(ModelSource("run", "run", str(base), merged=(tmp_path / "adapter",)), dtype=torch.bfloat16)
    whole = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32),
                                      str(tmp_path / "adapter")).merge_and_unload().to(torch.bfloat16)
    plain = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
    untouched = dict(plain.named_parameters())
    expected = dict(whole.named_parameters())
    assert sorted(expected) == sorted(name for name, _ in merged.named_parameters())  # no adapter modules left
    for name, parameter in merged.named_parameters():
        assert parameter.dtype == torch.bfloat16 and torch.equal(parameter, expected[name]), name
    # Buffers as a plain bf16 load has them: casting a whole fp32 model had rounded RoPE's frequencies to bf16.
    for (name, buffer), (_, plain_buffer) in zip(merged.named_buffers(), plain.named_buffers(), strict=True):
        assert buffer.dtype == plain_buffer.dtype and torch.equal(buffer, plain_buffer), name
    assert not torch.equal(dict(merged.named_parameters())["model.layers.0.mlp.up_proj.weight"],
                           untouched["model.layers.0.mlp.up_proj.weight"])  # the delta was merged, not dropped


def test_a_gemma_tokenizer_drops_its_python_vocabulary_and_encodes_and_saves_the_same(tmp_path, tiny_model):
    # transformers 5's GemmaTokenizer keeps the vocabulary and merges it built its Rust backend from as Python
    # objects (200 MB for the default model's 262k words); load_tokenizer frees them.
    import json
    import shutil

    from transformers import AutoTokenizer

    folder = tmp_path / "gemma-class"
    shutil.copytree(tiny_model, folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "tokenizer_class": "GemmaTokenizer"}))
    plain = AutoTokenizer.from_pretrained(folder)
    assert type(plain).__name__ == "GemmaTokenizer" and len(plain._vocab) > 100 and plain._merges
    model_config = json.loads((folder / "config.json").read_text())  # the class adds a <mask> word the tiny model lacks
    (folder / "config.json").write_text(json.dumps({**model_config, "vocab_size": len(plain)}))

    lean = load.load_tokenizer(load.resolve(str(folder), progress=False))
    assert not lean._vocab and not lean._merges
    text = "<start_of_turn>user\nなんで空は青いの?<end_of_turn>\n<start_of_turn>model\n青い光が散らばるからだよ。"
    assert lean(text)["input_ids"] == plain(text)["input_ids"]
    assert lean.decode(plain(text)["input_ids"]) == plain.decode(plain(text)["input_ids"])
    assert lean.get_vocab() == plain.get_vocab()
    lean.save_pretrained(tmp_path / "lean")
    plain.save_pretrained(tmp_path / "plain")
    assert (tmp_path / "lean/tokenizer.json").read_bytes() == (tmp_path / "plain/tokenizer.json").read_bytes()


def test_control_tokens_a_gguf_left_unflagged_are_not_printed_in_answers(tmp_path, tiny_model):
    # The default model's GGUF marks Gemma 3's image markers as plain added tokens; decoded answers showed them.
    import json
    import shutil

    from transformers import AutoTokenizer

    folder = tmp_path / "from-gguf"
    shutil.copytree(tiny_model, folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.add_tokens(["<start_of_image>", "<table>"])  # as the GGUF has them: neither flagged special
    tokenizer.save_pretrained(folder)
    model_config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**model_config, "vocab_size": len(tokenizer)}))
    ids = tokenizer.encode("空<start_of_image><table>", add_special_tokens=False)
    assert tokenizer.decode(ids, skip_special_tokens=True) == "空<start_of_image><table>"

    loaded = load.load_tokenizer(load.resolve(str(folder), progress=False))
    assert loaded.encode("空<start_of_image><table>", add_special_tokens=False) == ids  # the same tokens
    assert loaded.decode(ids, skip_special_tokens=True) == "空<table>"  # <table> is text (an HTML tag)


def test_a_gguf_of_another_family_converts_to_the_model_and_vocabulary_it_holds(tmp_path, monkeypatch, tiny_gguf,
                                                                             tokenizer):
    # Not the default Gemma: files of the families users bring (byte-level vocabularies; a Llama's query and key rows
    # in llama.cpp's order). transformers' reader added GPT-2's <|endoftext|> past the end of a vocabulary without
    # one (Llama 3's, this test's), and the vocabulary check refused the file.
    import torch
    from transformers import AutoModelForCausalLM

    monkeypatch.setenv("SHITATE_HOME", str(tmp_path / "home"))
    folder, gguf_file = tiny_gguf
    source = load.resolve(str(gguf_file), progress=False)
    assert source.kind == "gguf" and Path(source.folder).parent == tmp_path / "home" / "models"

    converted = load.load_tokenizer(source)
    text = "なんで空は青いの?<end_of_turn>"
    assert len(converted) == len(tokenizer) == 600
    assert converted.encode(text, add_special_tokens=False) == tokenizer.encode(text, add_special_tokens=False)
    ids = torch.tensor([tokenizer.encode(text, add_special_tokens=False)])
    original = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
    model = load.load_model(source, dtype=torch.bfloat16)
    with torch.inference_mode():
        torch.testing.assert_close(model(ids).logits, original(ids).logits, rtol=0, atol=0)
