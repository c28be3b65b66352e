"""Shared fixtures: a tokenizer shipped in tests/assets and a tiny Gemma 3 built from a config.

Nothing here touches the network or the 270M weights.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# rich wraps printed messages at the terminal's width (80 columns under CliRunner), breaking a long temporary path
# mid-word (`blan k.txt` under pytest-xdist's longer paths); tests read messages whole.
os.environ["COLUMNS"] = "250"

ASSETS = Path(__file__).parent / "assets"
REPO = Path(__file__).parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(ASSETS / "tiny-tokenizer")


def build_tiny_model(folder: Path, tokenizer) -> Path:
    """A 2-layer Gemma 3 (one sliding-window layer, one global) with 64-wide hidden states."""
    import torch
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    config = Gemma3TextConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=32, max_position_embeddings=1024,
        layer_types=["sliding_attention", "full_attention"], sliding_window=16, initializer_range=0.1,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    model = Gemma3ForCausalLM(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory, tokenizer) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-gemma3"), tokenizer)


# A two-question chat with a system prompt: the shape every template and mask test renders.
MULTI_TURN = [
    {"role": "system", "content": "あなたは子どもの疑問に答えるチャットボットです。"},
    {"role": "user", "content": "なんで空は青いの?"},
    {"role": "assistant", "content": "青い光がいちばん散らばるからだよ。"},
    {"role": "user", "content": "夕焼けは?"},
    {"role": "assistant", "content": "赤い光が残るからだよ。"},
]


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def kids_records(limit: int | None = None) -> list[dict]:
    """The demo's own question/answer pairs as chat records."""
    import csv

    rows = list(csv.DictReader((REPO / "examples/kids_qa/kids_qa.csv").open(encoding="utf-8")))[:limit]
    return [{"messages": [{"role": "user", "content": r["question"]}, {"role": "assistant", "content": r["answer"]}]}
            for r in rows]


def crashed_copy(run: Path, folder: Path, last_checkpoint: int) -> Path:
    """A copy of a finished run as a crash would leave it: no final weights, nothing after `last_checkpoint`."""
    import shutil

    shutil.copytree(run, folder)
    shutil.rmtree(folder / "adapter")
    for checkpoint in (folder / "checkpoints").iterdir():
        if int(checkpoint.name.removeprefix("step-")) > last_checkpoint:
            shutil.rmtree(checkpoint)
    return folder


def assert_same_adapter(run: Path, other: Path, atol: float = 1e-6) -> None:
    """Both runs' final adapters hold the same tensors, to `atol`."""
    import torch
    from safetensors.torch import load_file

    expected = load_file(run / "adapter" / "adapter_model.safetensors")
    got = load_file(other / "adapter" / "adapter_model.safetensors")
    assert expected.keys() == got.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=atol)


@pytest.fixture(scope="session", params=["llama", "qwen2", "qwen3", "gpt2"])
def tiny_gguf(request, tmp_path_factory, tokenizer) -> tuple[Path, Path]:
    """A tiny Llama, Qwen2, Qwen3 or GPT-2 as a model folder, and the same model as llama.cpp's converter writes its GGUF."""
    from tiny_families import build_tiny, write_gguf

    folder = build_tiny(request.param, tmp_path_factory.mktemp(f"tiny-{request.param}"), tokenizer)
    return folder, write_gguf(folder, tmp_path_factory.mktemp(f"{request.param}-gguf") / f"tiny-{request.param}-f32.gguf")


def quantised_layer_types(monkeypatch) -> set[str]:
    """Filled, when a training run starts, with the names of the 4-bit layer types in the model it trains."""
    from shitate.train.session import Session

    seen: set[str] = set()
    original = Session.start

    def spy(self, model, *args, **kwargs):
        seen.update(type(m).__name__ for m in model.modules() if "4bit" in type(m).__name__)
        return original(self, model, *args, **kwargs)

    monkeypatch.setattr(Session, "start", spy)
    return seen
