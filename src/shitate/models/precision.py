"""Which arithmetic training uses, and a frozen 16-bit base computed in fp32 without an fp32 copy of it.

bf16 halves the bytes, but not always the time. On a 2-core cloud Xeon that lists AVX512-BF16 but no AMX, torch's
bf16 matmul ran at 174 GFLOP/s and its fp32 matmul at 330 on the same cores: kids_qa's LoRA training went from 140
to 194 tokens/s in fp32. With AMX (bf16 955 GFLOP/s on another Xeon) it is the other way round. So `precision: auto`
on a CPU times both, once per machine (the result is kept under $SHITATE_HOME, so every run and resume on the
machine makes the same choice), and takes the faster.

A frozen base whose file holds 16-bit weights (the default model's cache is bf16; so are most published models)
stays in that dtype under fp32 arithmetic: each layer widens its weight as it runs, exactly — the same numbers as an
fp32 copy of the model, at half its weight memory (0.5 GB for Gemma 3 270M). `widen_arithmetic` does it for the
layers that hold the bulk of the weights (linear layers, GPT-2's Conv1D, embeddings); any other frozen 16-bit
tensor, a norm's scale, is small and is widened in place.
"""

from __future__ import annotations

import contextlib
import contextvars
import ctypes
import functools
import json
import os
import threading
import time
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

# fp32 must be this much faster to be chosen: bf16 keeps activations at half the memory, and two timings this
# close could swap places from one measurement to the next.
_FP32_MARGIN = 1.15


def bf16_supported(device: str) -> bool:
    """Whether bf16 arithmetic is native here: a GPU that has it, or a CPU with AVX512-BF16 or AMX."""
    if device.startswith("cuda"):
        return torch.cuda.is_bf16_supported()
    try:
        flags = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="ignore")
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


def pick_precision(setting: str, device: str) -> tuple[str, str]:
    """Resolve the recipe's precision: (bf16 or fp32, the same for people, with the measurement behind it where `auto`
    timed this CPU). `auto` is bf16 on a GPU that has it; on a CPU the faster of bf16 and fp32 matmul where bf16 is
    native, else fp32."""
    if setting != "auto":
        return setting, setting
    if not bf16_supported(device):
        return "fp32", "fp32"
    if device.startswith("cuda"):
        return "bf16", "bf16"
    speeds = cpu_matmul_speeds()
    chosen = "fp32" if speeds["fp32"] >= _FP32_MARGIN * speeds["bf16"] else "bf16"
    return chosen, f"{chosen} (this CPU's matmul: {speeds['fp32']:.0f} GFLOP/s in fp32, {speeds['bf16']:.0f} in bf16)"


def cpu_matmul_speeds() -> dict[str, float]:
    """GFLOP/s of a bf16 and an fp32 matmul at a LoRA layer's shape on this CPU, measured once per machine (CPU
    model, cores torch uses, torch version) and kept under $SHITATE_HOME."""
    from shitate.memory import cpu_model
    from shitate.models.store import home

    key = f"{cpu_model()} | {torch.get_num_threads()} threads | torch {torch.__version__}"
    file = home() / "matmul-speeds.json"
    try:
        known = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        known = {}
    if key not in known:
        known[key] = {"bf16": _matmul_gflops(torch.bfloat16), "fp32": _matmul_gflops(torch.float32)}
        partial = file.with_name(f".{file.name}.{os.getpid()}.partial")
        try:
            file.parent.mkdir(parents=True, exist_ok=True)
            partial.write_text(json.dumps(known, indent=2), encoding="utf-8")
            os.replace(partial, file)
        except OSError:  # a read-only home: measured again next time
            pass
    return {name: float(value) for name, value in known[key].items()}


def _matmul_gflops(dtype: torch.dtype, rows: int = 512, width: int = 640, out: int = 2048, repeats: int = 5) -> float:
    """The best of a few timed matmuls: a 512-token micro-batch through a 640 → 2048 layer (Gemma 3 270M's MLP)."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(rows, width, generator=generator).to(dtype)
    w = torch.randn(out, width, generator=generator).to(dtype)
    torch.nn.functional.linear(x, w)  # the first call sets up the kernel
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        torch.nn.functional.linear(x, w)
        best = min(best, time.perf_counter() - started)
    return 2 * rows * width * out / best / 1e9


def frozen_base_dtype(precision: str, stored: Any, full_fine_tune: bool) -> torch.dtype:
    """The dtype to load a base in: fp32 masters for a full fine-tune; bf16 under bf16 arithmetic; under fp32
    arithmetic the file's own dtype when it is 16-bit (widened exactly as each layer runs), else fp32."""
    if full_fine_tune:
        return torch.float32
    if precision == "bf16":
        return torch.bfloat16
    if isinstance(stored, str):
        stored = getattr(torch, stored, None)
    return stored if stored in (torch.bfloat16, torch.float16) else torch.float32


_scratch = threading.local()


def _widened(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`weight` in `dtype`, written into a buffer this thread keeps for weights of that shape. A fresh copy for every
    product was a block of up to 32 MB freed again at once (a 1B model's MLP), interleaved with the activations
    kept for backward, and the C heap fragmented around them: LoRA on a 1B-shaped Gemma 3 peaked at 6.0 GB, 4.2 with
    these buffers, at the same speed (at 270M no change was measurable). Products in one thread run one after
    another and none keeps its input, so one buffer a shape is enough; 75 MB a thread at 1B, 12 MB at 270M."""
    state = getattr(weight, "quant_state", None)
    if state is not None:  # a bitsandbytes 4-bit weight (QLoRA): dequantised, into a buffer the same way
        return _dequantised(weight, state, dtype)
    return _buffer(tuple(weight.shape), dtype, weight.device).copy_(weight)


def _dequantised(weight: torch.Tensor, state: Any, dtype: torch.dtype) -> torch.Tensor:
    """A 4-bit NF4 weight in `dtype`, in this thread's buffer for its shape. bitsandbytes (0.50) has no CPU kernel
    that writes into a given tensor (its `dequantize_4bit.out` is not registered there), so its C function is called
    here as its own CPU op calls it; where that is not available, its allocating op."""
    import bitsandbytes

    shape = tuple(state.shape)
    absmax = state.absmax
    if state.nested:
        absmax = bitsandbytes.functional.dequantize_blockwise(state.absmax, state.state2) + state.offset
    kernel = getattr(bitsandbytes.cextension.lib, f"cdequantize_blockwise_cpu_nf4_{_C_DTYPES.get(dtype)}", None)
    if (weight.device.type != "cpu" or state.quant_type != "nf4" or kernel is None or len(shape) != 2
            or shape[1] % 2 or state.blocksize >= 2048):  # the cases bitsandbytes' CPU op hands to its generic code
        return bitsandbytes.functional.dequantize_4bit(weight.data, state).to(dtype)
    out = _buffer(shape, dtype, weight.device)
    packed = weight.data.view(torch.uint8).reshape(shape[0], shape[1] // 2)
    scales = absmax.float().contiguous()  # held by a name while the C function reads it through a bare pointer
    get_ptr = bitsandbytes.functional.get_ptr
    kernel(get_ptr(packed), get_ptr(scales), get_ptr(out), ctypes.c_longlong(state.blocksize),
           ctypes.c_longlong(shape[0]), ctypes.c_longlong(shape[1]))
    return out


_C_DTYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def _buffer(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    buffers = _scratch.__dict__.setdefault("buffers", {})
    buffer = buffers.get((shape, dtype, device))
    if buffer is None:
        buffer = buffers[shape, dtype, device] = torch.empty(shape, dtype=dtype, device=device)
    return buffer


class _WideLinear(torch.autograd.Function):
    """x·Wᵀ + b with a frozen W (and b) stored narrower than x (16 or 4 bits), widened for the matmul. Backward widens
    W again rather than keep the wide copy alive until then: that copy, for every layer, is the fp32 model this avoids."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(weight)
        return nn.functional.linear(x, _widened(weight, x.dtype), None if bias is None else bias.to(x.dtype))

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[Any, ...]:
        (weight,) = ctx.saved_tensors
        return grad_out @ _widened(weight, grad_out.dtype), None, None


# Generation during training (the answer check, rollouts) with a model `widen_arithmetic` made: a decoding step of
# this many rows or fewer multiplies in the weights' own dtype. Its matmul reads the weights more than it computes,
# and widening them first cost more than it saved: 16 rows through a 640 → 2048 layer took 0.31 ms in bf16 against
# 0.40–0.70 ms widened, where 64 rows or more run faster widened (2-core Xeon without AMX). Prompts, many rows at
# once, stay widened; the sampled answers are scored again by the training forward, in fp32.
_DECODE_ROWS = 32
_generating = contextvars.ContextVar("generating", default=False)


@contextlib.contextmanager
def generating() -> Iterator[None]:
    """Generation in this block (this thread) decodes in the frozen weights' own dtype; elsewhere it does nothing."""
    token = _generating.set(True)
    try:
        yield
    finally:
        _generating.reset(token)


def _in_weights_dtype(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x·Wᵀ + b multiplied in W's own (narrower) dtype, handed back in x's."""
    return nn.functional.linear(x.to(weight.dtype), weight, bias).to(x.dtype)


def _wide_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    if _generating.get() and x.numel() <= _DECODE_ROWS * x.shape[-1] and weight.is_floating_point():
        return _in_weights_dtype(x, weight, bias)
    return _WideLinear.apply(x, weight, bias)


def _wide_linear_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return _wide_linear(x, self.weight, self.bias)


def _wide_conv1d_forward(self: Any, x: torch.Tensor) -> torch.Tensor:
    # transformers' Conv1D (GPT-2) keeps its weight as (in, out): the transposed view is a linear layer's weight.
    return _wide_linear(x, self.weight.t(), self.bias)


def _narrow_output_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    # The output layer is trained through models/logprobs, which widens it a block of words at a time; this forward
    # serves generation during training (the answer check, rollouts), where widening all of a 262k-word layer for
    # every new token would cost more than the matmul itself. Its logits are bf16-rounded, as bf16 inference's are.
    return _in_weights_dtype(x, self.weight, self.bias)


def _wide_embedding_forward(self: nn.Embedding, input_ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    rows = nn.functional.embedding(input_ids, self.weight, self.padding_idx, self.max_norm, self.norm_type,
                                   self.scale_grad_by_freq, self.sparse).to(dtype)
    # Gemma 3 scales its embeddings; its Python float is exact where its buffer was rounded to the weights' dtype.
    scale = getattr(self, "scalar_embed_scale", getattr(self, "embed_scale", None))
    if scale is None:
        return rows
    return rows * (scale.to(rows.dtype) if isinstance(scale, torch.Tensor) else scale)


def _is_bitsandbytes_4bit(module: nn.Module) -> bool:
    """bitsandbytes' own 4-bit layer (PEFT's LoRA layer around one has the same class name)."""
    return type(module).__name__ == "Linear4bit" and type(module).__module__.startswith("bitsandbytes")


def widen_arithmetic(model: nn.Module, dtype: torch.dtype) -> None:
    """Make a model whose frozen weights are narrower than `dtype` compute in `dtype`."""
    from transformers.pytorch_utils import Conv1D

    def narrow(tensor: torch.Tensor | None) -> bool:
        return tensor is not None and tensor.is_floating_point() and tensor.element_size() < dtype.itemsize

    output_layer = getattr(model, "get_output_embeddings", lambda: None)()
    covered: set[int] = set()
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if _is_bitsandbytes_4bit(module) and weight is not None and weight.device.type == "cpu":
            # bitsandbytes' own forward dequantises into a fresh block every product, fragmenting the heap as widening
            # did (a 1B-shaped QLoRA run peaked at 3.8-4.6 GB); on a GPU its own kernels stay.
            module.forward = types.MethodType(_wide_linear_forward, module)
            continue
        if not isinstance(weight, nn.Parameter) or weight.requires_grad or not narrow(weight):
            continue
        forward: Any
        if module is output_layer:
            forward = _narrow_output_forward
        elif type(module) is nn.Linear:
            forward = _wide_linear_forward
        elif type(module) is Conv1D:
            forward = _wide_conv1d_forward
        elif type(module) is nn.Embedding or type(module).__name__.endswith("ScaledWordEmbedding"):
            forward = functools.partial(_wide_embedding_forward, dtype=dtype)
        else:
            continue
        module.forward = types.MethodType(forward, module)
        covered.add(id(weight))
        if getattr(module, "bias", None) is not None:
            covered.add(id(module.bias))
    for tensor in [*model.parameters(), *model.buffers()]:
        if id(tensor) not in covered and narrow(tensor):
            tensor.data = tensor.data.to(dtype)
