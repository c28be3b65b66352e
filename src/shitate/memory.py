"""Memory: give freed memory back, and check a training configuration fits before spending time on it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

# Entries each of oneDNN's two shape-keyed caches may hold (its default is 1024). One training step
# uses a few dozen distinct matmul shapes, reused by every layer, so 32 keeps the step's hits; but
# every new batch width adds ~9 MB of entries, and at 1024 they grew a run's memory by ~0.3 GB.
KERNEL_CACHE_ENTRIES = 32


def bound_kernel_caches(entries: int = KERNEL_CACHE_ENTRIES) -> None:
    """Cap oneDNN's primitive cache and ideep's LRU cache unless the user set them.

    Both read their environment variable on first use, so this must run before the first CPU matmul;
    afterwards it does nothing (torch has no API to resize them).
    """
    import os

    os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", str(entries))
    os.environ.setdefault("LRU_CACHE_CAPACITY", str(entries))


def release_memory() -> None:
    """Collect garbage and hand freed heap back to the OS, so peak memory reflects what is in use."""
    import gc

    gc.collect()
    return_free_heap()


def return_free_heap() -> None:
    """Give glibc's free heap pages back to the OS.

    glibc keeps up to 64 MB at the heap's top and every free hole inside it resident; after a
    training step that is much of the step's churn. Trimming between steps lowered kids_qa's peak
    by 0.01-0.03 GB, within the noise of its speed.
    """
    global _libc
    if _libc is None:
        import ctypes

        try:
            _libc = ctypes.CDLL("libc.so.6")
            _libc.malloc_trim  # noqa: B018 - fails on a libc without it (musl, macOS)
        except (OSError, AttributeError):
            _libc = False
    if _libc:
        _libc.malloc_trim(0)


_libc: Any = None  # the C library once looked up; False where it has no malloc_trim


# Activation bytes a decoder layer keeps per token in bf16, per unit of width, fitted on Gemma 3 270M
# (24.3 KB per layer per token with the lean LoRA/RMSNorm/attention forwards, which remake the adapters' inputs
# from the norms' inputs and the MLP's gate and up, measured with saved-tensor hooks on a 248-token kids_qa
# micro-batch). A plain estimate, not a promise: `shitate train --dry-run` measures the peak.
_BYTES_PER_WIDTH = 1.5


def activation_bytes_per_token(config: Any, precision: str) -> float:
    """Estimated activation memory per token for a decoder-only transformer config."""
    hidden = config.hidden_size
    attention = config.num_attention_heads * (getattr(config, "head_dim", None) or hidden // config.num_attention_heads)
    # GPT-2's config names its MLP width n_inner, and leaves it None for the usual four times the hidden size.
    intermediate = getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None) or 4 * hidden
    width = 6 * hidden + 3 * intermediate + 6 * attention
    scale = 1.0 if precision == "bf16" else 2.0
    return _BYTES_PER_WIDTH * width * config.num_hidden_layers * scale


def training_bytes(config: Any, precision: str, micro_batch_tokens: int, trainable_parameters: int,
                   full_fine_tune: bool, loss_workspace: int, checkpointing: bool = False) -> int:
    """Memory training adds on top of the loaded model: activations, the loss's working set, optimizer state."""
    activations = activation_bytes_per_token(config, precision) * micro_batch_tokens
    if checkpointing:  # one layer's activations at a time, plus every layer's input
        layer_inputs = 2 * config.hidden_size * config.num_hidden_layers * micro_batch_tokens
        activations = activations / config.num_hidden_layers + layer_inputs
    # The loss's working set (models/logprobs.loss_workspace_bytes); a full fine-tune also keeps an fp32 gradient of
    # the output layer, counted below with the trained parameters.
    loss = loss_workspace
    # fp32 weights' gradients plus AdamW's two moments; a full fine-tune also upcasts the weights it trains.
    optimizer = trainable_parameters * (4 + 8 + (4 if full_fine_tune else 0))
    return int(1.2 * (activations + loss + optimizer))


# What each engine splits across the devices (configs/accelerate/): nothing, the optimizer state, also the
# gradients, also the weights. FSDP's full shard splits what ZeRO-3 does.
ENGINES = {"ddp": (), "zero1": ("optimizer",), "zero2": ("optimizer", "gradients"),
           "zero3": ("optimizer", "gradients", "weights")}


def per_device_bytes(config: Any, total_parameters: int, trainable_parameters: int, micro_batch_tokens: int,
                     devices: int, engine: str, loss_workspace: int, checkpointing: bool = True) -> dict[str, int]:
    """Memory on each of `devices` GPUs for training in bf16 under `engine`, by part.

    The accounting of the ZeRO paper (Rajbhandari et al. 2020, section 3) for mixed precision: bf16 weights
    (2 bytes a parameter, frozen or trained), bf16 gradients of the trained parameters (2 bytes), and AdamW's
    fp32 master copy and two moments (12 bytes a trained parameter); each part an engine shards is divided by
    the devices. Activations are each device's own, for its micro-batch.
    """
    sharded = ENGINES[engine]

    def split(part: str, size: float) -> int:
        return int(size / devices) if part in sharded else int(size)

    activations = training_bytes(config, "bf16", micro_batch_tokens, 0, False, loss_workspace, checkpointing)
    return {"weights": split("weights", 2 * total_parameters), "gradients": split("gradients", 2 * trainable_parameters),
            "optimizer": split("optimizer", 12 * trainable_parameters), "activations": activations}


def available_bytes(device: str) -> int:
    """Memory this process can still take: free GPU memory, or the machine's available RAM."""
    if device.startswith("cuda"):
        import torch

        return torch.cuda.mem_get_info()[0]
    import psutil

    return psutil.virtual_memory().available


def peak_gpu_bytes() -> int | None:
    """The most GPU memory torch has held at once in this process (None without CUDA): RSS does not count it."""
    import torch

    return torch.cuda.max_memory_allocated() if torch.cuda.is_available() and torch.cuda.is_initialized() else None


def peak_rss_bytes() -> int:
    """This process's peak resident memory so far.

    Linux's VmHWM first: getrusage's ru_maxrss carries the parent's high-water mark across fork and exec, so a
    process launched by a bigger one (a bench's sides, the ranks `train --nproc` starts) would report the
    parent's peak as its own.
    """
    import resource
    import sys

    try:
        for line in Path("/proc/self/status").read_text(encoding="ascii", errors="ignore").splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def cpu_model() -> str:
    """The CPU's model name as lscpu gives it: speeds differ 2× across CPUs with the same matmul peak, so every
    figure is reported beside it."""
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="ignore").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or "unknown CPU"
