"""Tiny models of the families users bring besides the default Gemma 3 270M, as folders and as GGUF files.

Llama (Llama 3, ELYZA, Swallow, llm-jp), Mistral, Qwen2 (biases on the projections, a tied output layer), Qwen3
(a norm on each head's queries and keys), Gemma 2
(soft-capped attention scores), Gemma 3 with a vision tower (4B and up), GPT-NeoX (open-calm, rinna's) and GPT-2 (the
Japanese GPT-2s: Conv1D layers, learned positions). The GGUF files are written the way llama.cpp's
convert_hf_to_gguf.py writes them — a Llama's query and key rows permuted, GPT-2's layers transposed, a byte-level
(`gpt2`) vocabulary and its merges; llama.cpp's converter is not a package, so this writes the few fields
transformers reads. The permutation is written here independently of shitate's export, and transformers' reader
undoes it: a test that reads such a file back checks both.
"""

from __future__ import annotations

import json
from pathlib import Path


def gpt2_like_tokenizer():
    """A byte-level BPE as a Japanese GPT-2 or a base Llama has one: <|endoftext|> its only special token — no padding
    token, none of the chat templates' turn markers — trained on the kids_qa questions and answers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from conftest import kids_records

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    texts = [m["content"] for r in kids_records() for m in r["messages"]] + ["### User: Assistant:"]
    backend.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=500, special_tokens=["<|endoftext|>"],
                                                           initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|endoftext|>", eos_token="<|endoftext|>")


def build_tiny(family: str, folder: Path, tokenizer) -> Path:
    """A 2-layer model: a Llama with grouped-query attention (4 query heads, 2 key/value heads) and its own output
    layer, a Mistral like it with a sliding window, a Qwen2 with biases (drawn non-zero, so they count) and the
    output layer tied to the embeddings, a Gemma 2 (a sliding-window layer, soft-capped scores), a GPT-NeoX or a
    GPT-2 (4 heads, its config's own names)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
           "pad_token_id": tokenizer.pad_token_id}
    if family == "gemma2":  # Google's gemma-2-2b-jpn-it: attention scores soft-capped, which no SDPA kernel does
        config = AutoConfig.for_model("gemma2", vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                      sliding_window=16, max_position_embeddings=512, initializer_range=0.1,
                                      query_pre_attn_scalar=1, attn_logit_softcapping=1.0, **ids)  # scores that reach
        # the cap (Gemma's own: 50), so that it matters
    elif family == "gemma3_vision":  # Gemma 3 from 4B up: a SigLIP vision tower beside the language model
        text = AutoConfig.for_model("gemma3_text", vocab_size=len(tokenizer) + 3, hidden_size=64, intermediate_size=128,
                                    num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=32,
                                    layer_types=["sliding_attention", "full_attention"], sliding_window=16,
                                    initializer_range=0.1, **ids)
        vision = AutoConfig.for_model("siglip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=2, image_size=28, patch_size=14)
        config = AutoConfig.for_model("gemma3", text_config=text.to_dict(), vision_config=vision.to_dict(),
                                      mm_tokens_per_image=4, boi_token_index=len(tokenizer),
                                      eoi_token_index=len(tokenizer) + 1, image_token_index=len(tokenizer) + 2)
    elif family == "gpt2":
        config = AutoConfig.for_model("gpt2", vocab_size=len(tokenizer), n_embd=64, n_layer=2, n_head=4,
                                      n_positions=1024, initializer_range=0.1, **ids)  # transformers' GGUF reader
        # sets n_ctx, not n_positions, from a file's context length: 1024, every GPT-2's, is the length that reads back
    elif family == "gpt_neox":  # open-calm, rinna's japanese-gpt-neox: fused query/key/value, rotary on a quarter
        config = AutoConfig.for_model("gpt_neox", vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                                      num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=512,
                                      initializer_range=0.1, **ids)
    else:  # llama, qwen2, qwen3 (a norm on each head's queries and keys), mistral (with a 16-token sliding window)
        config = AutoConfig.for_model(family, vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=512, tie_word_embeddings=family.startswith("qwen"),
                                      initializer_range=0.1, **({"sliding_window": 16} if family == "mistral" else {}),
                                      **({"head_dim": 128} if family == "qwen3" else {}), **ids)  # every Qwen3's
        # head_dim, wider than hidden_size / heads: the reader of its GGUF files assumes it
    model = AutoModelForCausalLM.from_config(config)
    for name, parameter in model.named_parameters():
        if name.endswith(".bias"):
            torch.nn.init.normal_(parameter, std=0.1)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def permute_as_llama_cpp(weights, heads: int):
    # convert_hf_to_gguf.py's LlamaModel.permute, in NumPy
    return weights.reshape(heads, 2, weights.shape[0] // heads // 2, *weights.shape[1:]).swapaxes(1, 2).reshape(weights.shape)


def write_gguf(folder: Path, path: Path) -> Path:
    """`path`: the model of `folder` (config, safetensors, a byte-level BPE tokenizer.json) as an f32 GGUF."""
    import gguf
    from safetensors.torch import load_file

    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    saved = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    family = config["model_type"]
    writer = gguf.GGUFWriter(str(path), family)
    if family == "gpt2":
        writer.add_context_length(config["n_positions"])
        writer.add_embedding_length(config["n_embd"])
        writer.add_block_count(config["n_layer"])
        writer.add_feed_forward_length(4 * config["n_embd"])
        writer.add_head_count(config["n_head"])
        writer.add_layer_norm_eps(config["layer_norm_epsilon"])
    else:
        writer.add_context_length(config["max_position_embeddings"])
        writer.add_embedding_length(config["hidden_size"])
        writer.add_block_count(config["num_hidden_layers"])
        writer.add_feed_forward_length(config["intermediate_size"])
        writer.add_head_count(config["num_attention_heads"])
        writer.add_head_count_kv(config["num_key_value_heads"])
        writer.add_rope_dimension_count(config["hidden_size"] // config["num_attention_heads"])
        writer.add_rope_freq_base(config["rope_parameters"]["rope_theta"])
        writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_vocab_size(config["vocab_size"])

    ids = {**saved["model"]["vocab"], **{t["content"]: t["id"] for t in saved["added_tokens"]}}
    tokens = sorted(ids, key=ids.__getitem__)
    special = {t["content"] for t in saved["added_tokens"] if t["special"]}
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")  # GPT-2's split, as the test tokenizer was trained with
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.CONTROL if t in special else gguf.TokenType.NORMAL for t in tokens])
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in saved["model"]["merges"]])
    writer.add_bos_token_id(config["bos_token_id"])
    writer.add_eos_token_id(config["eos_token_id"])
    writer.add_pad_token_id(config["pad_token_id"])

    architecture = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == family)
    names = gguf.get_tensor_name_map(architecture, config.get("num_hidden_layers") or config["n_layer"])
    for hf_name, tensor in load_file(str(folder / "model.safetensors")).items():
        stem, _, suffix = hf_name.rpartition(".")
        data = tensor.float().numpy()
        if family == "llama" and stem.endswith("q_proj"):
            data = permute_as_llama_cpp(data, config["num_attention_heads"])
        elif family == "llama" and stem.endswith("k_proj"):
            data = permute_as_llama_cpp(data, config["num_key_value_heads"])
        elif family == "gpt2" and stem.endswith(("c_attn", "c_proj", "c_fc")) and suffix == "weight":
            data = data.T  # Conv1D keeps (in, out); llama.cpp's files (out, in)
        name = names.get_name(stem)
        writer.add_tensor(f"{name}.{suffix}", data)
        if family == "gpt2" and name == "token_embd":
            writer.add_tensor("output.weight", data)  # GPT-2's output layer is its embedding; llama.cpp writes both
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
