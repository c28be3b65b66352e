"""The only place that loads weights: resolve what the user named, then load model and tokenizer.

A model reference is one of: the embedded default (`gemma-3-270m`), a local Hugging Face
folder, a `.gguf` file, a shitate run folder (its adapter on top of its base), or a hub id.
Only a hub id may touch the network, and only because the user asked for it.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from shitate.errors import ModelError
from shitate.memory import release_memory, return_free_heap
from shitate.models.store import DEFAULT_MODEL, convert_gguf, default_model_folder
from shitate.progress import quiet_libraries
from shitate.runs import RunFolder

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")


@dataclass(frozen=True)
class ModelSource:
    """Where weights come from: a folder to load, and for a run folder its adapter and recipe."""

    kind: Literal["default", "folder", "gguf", "run", "hub"]
    reference: str
    folder: str  # a local folder, or the hub id for kind == "hub"
    adapter: Path | None = None
    run: Path | None = None
    # Adapters merged into the base, in order, before `adapter` goes on top: a run that started from
    # another run (ppo from an sft run) trained its adapter on that run's merged model.
    merged: tuple[Path, ...] = ()

    def for_training(self) -> ModelSource:
        """The model to train on: this source with its own adapter merged in, so a new adapter goes on top."""
        if self.adapter is None:
            return self
        return ModelSource(self.kind, self.reference, self.folder, None, self.run, self.merged + (self.adapter,))


def resolve(reference: str, progress: bool = True) -> ModelSource:
    """Turn a user's model reference into a loadable source, converting GGUF files once."""
    if reference == DEFAULT_MODEL:
        return ModelSource("default", reference, str(default_model_folder(progress)))
    path = Path(reference).expanduser()
    if path.is_dir():
        run = RunFolder(path)
        if run.is_finished():
            final = run.final_dir()
            if final is not None and final.name == "model":
                return ModelSource("run", reference, str(final), run=path)
            base = resolve(run.recipe_setting("model", DEFAULT_MODEL), progress).for_training()
            return ModelSource("run", reference, base.folder, adapter=final, run=path, merged=base.merged)
        if (path / "config.json").is_file():
            _check_model_folder(path)
            return ModelSource("folder", reference, str(path))
        if run.is_started():
            raise run.unfinished_error()
        raise ModelError(f"{path}: not a model folder (no config.json) and not a finished shitate run folder.")
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise ModelError(f"{path}: GGUF file not found. Check the path.")
        return ModelSource("gguf", reference, str(convert_gguf(path, progress=progress)))
    if path.exists():
        raise ModelError(f"{path}: not a model. Give a model folder, a .gguf file, a run folder or {DEFAULT_MODEL}.")
    if HUB_ID.match(reference) and not reference.startswith((".", "/", "~")):
        _check_hub_reachable(reference)
        return ModelSource("hub", reference, reference)
    raise ModelError(f"{reference}: no such file or folder. Give {DEFAULT_MODEL}, a local model folder, "
                     "a .gguf file, a run folder (runs/NAME), or a hub id such as org/name.")


WEIGHT_PATTERNS = ("*.safetensors", "*.safetensors.index.json", *(f"*{suffix}" for suffix in (".bin", ".pt", ".pth")))
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json", "spiece.model")


def _check_model_folder(path: Path) -> None:
    """A folder with a config.json but no weights or no tokenizer is a half-copied download: say so now,
    not as a library's error deep inside loading (or, for the tokenizer, a silent fallback)."""
    if not any(next(path.glob(pattern), None) for pattern in WEIGHT_PATTERNS):
        raise ModelError(f"{path}: has a config.json but no weights (model.safetensors). Copy the model's "
                         "*.safetensors files into it, or give the folder they are in.")
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise ModelError(f"{path}: has no tokenizer files ({', '.join(TOKENIZER_FILES[:3])}). Copy them from where "
                         "the model came from.")


def _check_vocabulary(source: ModelSource, tokenizer: Any) -> None:
    """A tokenizer with ids past the model's embedding table would fail mid-training (or read garbage on a GPU)."""
    try:
        rows = load_config(source).get_text_config().vocab_size
    except ModelError:
        return  # no config to compare with: the model's own loading says what is wrong
    if rows and len(tokenizer) > rows:
        raise ModelError(f"{source.reference}: the tokenizer does not match the model: its vocabulary has "
                         f"{len(tokenizer):,} tokens but the model's embedding has {rows:,} rows. Use the tokenizer "
                         "that came with the model (its tokenizer files beside config.json).")


def _check_hub_reachable(reference: str) -> None:
    """Fail in seconds, not after a minute of retries, when the hub cannot be reached (no proxy configured)."""
    import os
    import socket

    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "HF_ENDPOINT")) or os.environ.get("HF_HUB_OFFLINE") == "1":
        return  # a proxy or mirror may reach it where a direct connection cannot; offline mode fails on its own
    try:
        socket.create_connection(("huggingface.co", 443), timeout=5).close()
    except OSError:
        raise ModelError(f"{reference}: looks like a model hub id, but the hub cannot be reached from here (no network). "
                         "Download the model elsewhere and pass its local folder or .gguf file, "
                         f"or check the spelling if you meant a local path.") from None


def load_tokenizer(source: ModelSource) -> Any:
    """The tokenizer of a source, from local files unless it is a hub id."""
    from transformers import AutoTokenizer

    quiet_libraries()
    try:
        tokenizer = AutoTokenizer.from_pretrained(source.folder, local_files_only=source.kind != "hub")
    except OSError as err:
        raise _load_error(source, err) from None
    _check_vocabulary(source, tokenizer)
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        # Llama 3's, GPT-2's and most base models' tokenizers have none, and every batch (training's, and compare's
        # and eval's prompts) is padded: EOS pads them, under the attention mask, as transformers' generate does.
        tokenizer.pad_token = tokenizer.eos_token
    _flag_control_tokens(tokenizer)
    _drop_python_vocabulary(tokenizer)
    return tokenizer


def _flag_control_tokens(tokenizer: Any) -> None:
    """Flag special the control tokens a GGUF file left as plain added tokens, as the model's own tokenizer has them:
    unflagged, decoding kept them, and the base model's answers read "…color<start_of_image>"."""
    from shitate.data.templates import GGUF_UNFLAGGED_CONTROL_TOKENS

    added = getattr(tokenizer, "added_tokens_decoder", None) or {}
    unflagged = [str(token) for token in added.values()
                 if str(token) in GGUF_UNFLAGGED_CONTROL_TOKENS and not getattr(token, "special", True)]
    if unflagged:
        tokenizer.add_special_tokens({"extra_special_tokens": unflagged}, replace_extra_special_tokens=False)


def _drop_python_vocabulary(tokenizer: Any) -> None:
    """Free the Python copy of the vocabulary and merges a fast tokenizer was built from.

    transformers 5's model-specific tokenizers (Gemma's among them) parse tokenizer.json in Python, build the Rust
    backend from the vocabulary and merges, and keep both as attributes that nothing reads again: for Gemma's 262k
    words and 515k merges 0.2 GB, a sixth of `shitate generate`'s peak on a CPU. Encoding, decoding and saving use
    the backend only. A class that overrides `save_vocabulary` may write them from Python (Whisper does), so it
    keeps its copy.
    """
    from transformers import PreTrainedTokenizerFast

    if (not isinstance(tokenizer, PreTrainedTokenizerFast)
            or type(tokenizer).save_vocabulary is not PreTrainedTokenizerFast.save_vocabulary):
        return
    copies = [name for name in ("_vocab", "_merges") if isinstance(getattr(tokenizer, name, None), (dict, list))]
    if any(getattr(tokenizer, name) for name in copies):
        for name in copies:
            setattr(tokenizer, name, type(getattr(tokenizer, name))())
        release_memory()


def load_config(source: ModelSource) -> Any:
    """The model's configuration, without its weights."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(source.folder, local_files_only=source.kind != "hub")
    except OSError as err:
        raise _load_error(source, err) from None


def learned_position_limit(config: Any) -> int | None:
    """How many positions a model with a table of learned positions has (GPT-2's n_positions): past them the table has
    no row, and torch stops with an IndexError from inside the embedding. None for rotary positions, which reach past
    what the model was trained on (worse, but without failing)."""
    text = config.get_text_config()
    limit = getattr(text, "max_position_embeddings", None)
    if not limit or getattr(text, "rope_parameters", None) is not None:
        return None
    return int(limit)


def _contiguous_input(_: Any, args: tuple[Any, ...]) -> tuple[Any, ...]:
    """The output layer's input made contiguous. generate() hands it the last position of a batch, a strided
    slice; torch's CPU linear then expands the weight once per row and runs a batched matmul — for a 262k-word
    vocabulary and 16 rows 18 s and 2.7 GB in bf16 at every batched prefill, against 0.07 s contiguous."""
    return (args[0].contiguous(), *args[1:])


def _import_bitsandbytes_offline() -> None:
    """Import bitsandbytes, where it is installed, so that it cannot reach the model hub, and quiet it. PEFT imports it
    whenever it is installed (every LoRA run), and on a CPU with AVX512-BF16 its import fetches a kernel from the hub
    if the `kernels` package is installed too: a kernel for the inference layout `_keep_4bit_weights_trainable` turns
    off. Without `kernels` it logs, at every import, a warning that advises installing it."""
    import logging
    import sys
    from importlib.util import find_spec

    if "bitsandbytes" in sys.modules or find_spec("bitsandbytes") is None:
        return
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    if "kernels" in sys.modules or find_spec("kernels") is None:
        return  # nothing it could fetch with (or already imported by another library: its choice)
    sys.modules["kernels"] = None  # type: ignore[assignment]  # makes `import kernels` fail: the documented way
    try:
        import bitsandbytes  # noqa: F401
    finally:
        del sys.modules["kernels"]


def _drop_pages(tensor: Any) -> None:
    """Tell the kernel this tensor's whole pages are not needed any more (madvise DONTNEED): a 16-bit original just
    quantised, whose pages in the weights file's map would otherwise stay resident as long as the map lives."""
    import ctypes
    import mmap

    start = tensor.data_ptr()
    first, end = -(-start // mmap.PAGESIZE) * mmap.PAGESIZE, (start + tensor.nbytes) // mmap.PAGESIZE * mmap.PAGESIZE
    if end > first:  # whole pages only: a page shared with a neighbouring tensor is kept
        ctypes.CDLL(None, use_errno=True).madvise(ctypes.c_void_p(first), ctypes.c_size_t(end - first), 4)  # DONTNEED


def _quantise_on_the_cpu(model: Any, compute_dtype: Any) -> None:
    """Swap every linear layer but the output layer for bitsandbytes' NF4 layer, one at a time, each 16-bit original
    dropped from memory once its 4-bit copy exists.

    By hand rather than through transformers' quantiser: on a CPU that peaked at 5.0 GB loading a 1B model (2.0 GB
    file) and left 1.5 GB of the file's pages resident — the unquantised tensors (embedding, norms) are views into the
    file's memory map, which keeps every page quantising read alive. Here that load peaks at 0.96-1.03 GB. The same
    layers and settings (NF4, nested statistics) as transformers' quantiser, which the GPU path uses."""
    import bitsandbytes
    from torch import nn

    output_layer = model.get_output_embeddings()
    uses: dict[int, int] = {}
    for _, parameter in model.named_parameters(remove_duplicate=False):
        uses[id(parameter)] = uses.get(id(parameter), 0) + 1
    for parent in list(model.modules()):
        if sum(type(child) is nn.Linear for child in parent.children()) > 1:
            # quantising's scratch, each layer's, before the next adds its own: freed tensors, no cycles, so the heap
            # trim alone (a garbage collection here was 0.23 s a layer, half of a 270M model's 16 s load)
            return_free_heap()
        for name, child in list(parent.named_children()):
            if type(child) is not nn.Linear or child is output_layer or uses[id(child.weight)] > 1:
                continue  # a weight tied to another layer stays whole: quantising one copy would untie them
            layer = bitsandbytes.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                               compute_dtype=compute_dtype, quant_type="nf4", device="meta")
            layer.weight = bitsandbytes.nn.Params4bit(child.weight.data, requires_grad=False, quant_type="nf4",
                                                      compress_statistics=True, module=layer)._quantize("cpu")
            if child.bias is not None:
                layer.bias = nn.Parameter(child.bias.data.clone(), requires_grad=False)
            setattr(parent, name, layer)
            _drop_pages(child.weight.data)
    model.is_loaded_in_4bit = True  # what transformers' quantiser sets; PEFT gives such layers its 4-bit LoRA class
    release_memory()


def _keep_4bit_weights_trainable(model: Any) -> None:
    """bitsandbytes (0.50) repacks a 4-bit layer's weights for its fast CPU kernel at the first forward without
    gradients in eval mode (a validation pass), and from then on multiplies with that kernel in training too, where
    it has no backward: the gradient through every frozen layer to the ones before it was silently dropped (LoRA
    gradients 114% off after one validation pass, tested). Training keeps the plain layout; generation loads no
    4-bit base (a QLoRA run's adapter is applied to the base in 16 or 32 bits)."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def load_model(source: ModelSource, dtype: Any = None, merge_adapter: bool = False, four_bit: bool = False,
               compute_dtype: Any = None) -> Any:
    """A causal LM from a source; a run folder's adapter is attached (and merged if asked).

    `four_bit` loads the linear layers as NF4 through bitsandbytes (QLoRA), computing in `compute_dtype` (default
    `dtype`); the rest (embedding, norms) is loaded in `dtype`.
    """
    import torch
    from transformers import AutoModelForCausalLM

    quiet_libraries()
    _import_bitsandbytes_offline()
    extra: dict[str, Any] = {}
    if four_bit and torch.cuda.is_available():
        from transformers import BitsAndBytesConfig

        extra["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute_dtype or dtype or torch.bfloat16)
        extra["device_map"] = {"": torch.cuda.current_device()}
    if four_bit and source.merged:
        raise ModelError(f"{source.reference}: a run's adapter cannot be merged into 4-bit weights; continue from it "
                         "with adapter.method lora (or export the run merged and start QLoRA from that folder).")
    for folder in (Path(source.folder) if source.kind != "hub" else None, *source.merged, source.adapter):
        if folder is not None:
            refuse_pickle(folder)
    model: Any  # the transformers model, then PEFT's wrapper of it
    try:
        model = AutoModelForCausalLM.from_pretrained(source.folder, dtype=dtype or torch.float32,
                                                     local_files_only=source.kind != "hub",
                                                     use_safetensors=None if pickle_allowed() else True, **extra)
    except OSError as err:
        raise _load_error(source, err) from None
    if four_bit and not torch.cuda.is_available():
        _quantise_on_the_cpu(model, compute_dtype or dtype or torch.float32)
    if four_bit:
        _keep_4bit_weights_trainable(model)
    output_layer = model.get_output_embeddings()
    if output_layer is not None:
        output_layer.register_forward_pre_hook(_contiguous_input)
    for adapter in source.merged:
        model = _merge_in_fp32(model, adapter)
    if source.adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(source.adapter))
        if merge_adapter:
            model = model.merge_and_unload()
    return model


def _merge_in_fp32(model: Any, adapter: Path) -> Any:
    """The model with `adapter` merged into its weights, each adapted layer merged in fp32 and cast back.

    In fp32 the small LoRA deltas are added before one rounding, not rounded away first by bf16
    arithmetic; one layer at a time, because loading the whole base in fp32 to merge it took twice the
    weights' memory (a 7B base: 28 GB instead of 14) before training had begun.
    """
    import torch
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    wrapped = PeftModel.from_pretrained(model, str(adapter))
    with torch.no_grad():
        for module in wrapped.modules():
            if isinstance(module, LoraLayer):
                weight = module.get_base_layer().weight
                assert isinstance(weight, torch.Tensor)  # every LoRA base layer (linear, embedding, conv) has one
                kept = weight.dtype
                weight.data = weight.data.float()
                module.merge()  # PEFT's own merge (LoRA, DoRA, …), on the fp32 weight
                weight.data = weight.data.to(kept)
    return wrapped.unload()  # the base layers, now merged, without the adapter's modules


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")


def pickle_allowed() -> bool:
    """`shitate --allow-pickle …` (or SHITATE_ALLOW_PICKLE=1): the user trusts the pickle files they load."""
    return os.environ.get("SHITATE_ALLOW_PICKLE") == "1"


def refuse_pickle(folder: Path) -> None:
    """Weights load from safetensors (or GGUF) only: unpickling a file can run any code inside it."""
    folder = Path(folder)
    if pickle_allowed() or not folder.is_dir() or any(folder.glob("*.safetensors")):
        return
    pickled = sorted(f.name for f in folder.iterdir() if f.suffix in PICKLE_SUFFIXES)
    if pickled:
        raise ModelError(f"{folder}: its weights are pickle files ({', '.join(pickled[:3])}), and loading a pickle "
                         "can run code hidden in it. Convert them to safetensors where they came from, or, if you "
                         "trust the files, run `shitate --allow-pickle …`.")


def _load_error(source: ModelSource, err: Exception) -> ModelError:
    if source.kind == "hub":
        return ModelError(f"{source.reference}: could not fetch it from the model hub ({err.__class__.__name__}). "
                          "Without network access, download the model elsewhere and pass its local folder instead.")
    return ModelError(f"{source.folder}: could not load the model ({err}).")
