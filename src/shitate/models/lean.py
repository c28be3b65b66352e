"""Leaner autograd for the places where LoRA training on a CPU spends its memory.

Measured on Gemma 3 270M in bf16 autocast (bench/train_throughput.py): activations took about
1.6 MB per token, and most of it was not needed for the gradients (now 0.51 MB, 28.6 KB a layer):
- PEFT's LoRA forward casts each adapted layer's input to fp32, applies dropout to a copy and
  autocast casts it back: four copies of every input of seven layers, about 0.85 MB per token.
  Our version keeps the input the frozen layer keeps anyway and the dropped positions (int32, 5% of
  the elements); the adapter's output is added to the frozen layer's in the same addmm.
- Gemma's RMSNorm upcasts to fp32 and autograd keeps every intermediate: about 0.5 MB per token.
  Our version keeps the input and one fp32 scale per row, and recomputes the rest.
- Gemma's MLP keeps gelu(gate) beside gate and up; ours recomputes it in backward.
- A LoRA layer's input is kept for its A gradient. Where that input is a norm's output (q, k, v, gate,
  up) or the MLP's gelu(gate)·up (down), the norm's input or gate and up are kept anyway; the adapter
  keeps those and recomputes its input in backward (elementwise work, no matmul): 3,328 of 15,300
  values a token and layer, 22% of the activations.
The math is PEFT's and transformers' own (tests compare outputs and gradients); the modules,
their parameters and their saved files are untouched, so PEFT still saves and loads adapters.
"""

from __future__ import annotations

import functools
import math
import types
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


def _dropped_positions(numel: int, rate: float, seed: int, device: torch.device) -> torch.Tensor:
    """The flat positions where dropout zeroes a tensor of numel elements, drawn from a private generator seeded from
    the global one (a resumed run draws the same); positions past the end are numel (see _zero_at).

    The gaps between drops of a Bernoulli(rate) process are Geometric(rate): drawing those gaps takes about
    rate·numel uniform numbers (5% of the elements for LoRA's usual 0.05) where a mask takes one per element.
    A full-size mask cost about 1.5 ms a call for a 256-token MLP input, 10% of a kids_qa step on a 2-core Xeon.
    """
    expected = numel * rate
    # Enough gaps to pass the end but with a chance below 1e-15 (8 standard deviations); geometric_ itself takes a
    # scalar log per draw, 4x slower than the vectorised log of uniforms below.
    count = int(expected + 8 * math.sqrt(expected * (1 - rate)) + 16)
    generator = torch.Generator(device=device).manual_seed(seed)
    uniforms = torch.rand(count, generator=generator, device=device)
    gaps = torch.log1p(-uniforms).div_(math.log1p(-rate)).floor_().add_(1).to(torch.int64)
    return gaps.cumsum_(0).sub_(1).clamp_(max=numel)


# The attribute a lean forward sets on an output that can be recomputed cheaply from tensors backward keeps anyway:
# (function, *its tensor arguments). Set only while autograd records, so inference keeps nothing extra alive.
_RECOMPUTE = "_shitate_recompute"


def _mark_recomputable(output: torch.Tensor, function: Any, *inputs: torch.Tensor) -> torch.Tensor:
    if torch.is_grad_enabled() and output.requires_grad:
        setattr(output, _RECOMPUTE, (function, *inputs))
    return output


def _zero_at(values: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """values with its flat positions zeroed, in a new tensor one element longer: positions past the end fall on
    the spare element, so no position has to be selected (a masked select is a sync on a GPU)."""
    flat = torch.empty(values.numel() + 1, dtype=values.dtype, device=values.device)
    flat[:-1] = values.reshape(-1)
    flat.index_fill_(0, positions, 0)
    return flat[:-1].view(values.shape)


class _LoraAdd(torch.autograd.Function):
    """result + scale · B(A(dropout(x))) in one addmm, keeping only x (or what remakes it: see _RECOMPUTE), A·x and
    the dropped positions.

    The positions (int32, a tenth of x's bytes at LoRA's usual 5%) are kept rather than redrawn in backward: drawing
    them took a third of dropout's cost (torch's CPU generator takes ~8 ns a number on a 2-core Xeon).
    """

    @staticmethod
    def forward(ctx: Any, result: torch.Tensor, x: torch.Tensor, weight_a: torch.Tensor, weight_b: torch.Tensor,
                scale: float, dropout: float) -> torch.Tensor:
        compute = x.dtype
        positions = None
        if dropout > 0:  # the seed comes from the global RNG: seeded, and resumed with the checkpoint
            positions = _dropped_positions(x.numel(), dropout, int(torch.randint(0, 2**62, (1,))), x.device)
        dropped = x if positions is None else _zero_at(x, positions)
        low = dropped.reshape(-1, x.shape[-1]) @ weight_a.to(compute).T
        # 1/(1-p) rides on the rank-r product's scale, not on the full-width input: same value, less work.
        alpha = scale / (1.0 - dropout)
        out = torch.addmm(result.reshape(-1, result.shape[-1]), low, weight_b.to(compute).T, alpha=alpha)
        kept_positions: tuple[torch.Tensor, ...] = ()
        if positions is not None:  # numel itself marks "past the end", so int32 holds them below 2**31 - 1 elements
            kept_positions = (positions.to(torch.int32) if x.numel() < 2**31 - 1 else positions,)
        remake, *sources = getattr(x, _RECOMPUTE, None) or (None, x)
        ctx.remake, ctx.sources = remake, len(sources)
        ctx.save_for_backward(*sources, low, weight_a, weight_b, *kept_positions)
        ctx.alpha = alpha
        return out.view(result.shape)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[Any, ...]:
        saved = ctx.saved_tensors
        sources, (low, weight_a, weight_b, *kept_positions) = saved[:ctx.sources], saved[ctx.sources:]
        x = sources[0] if ctx.remake is None else ctx.remake(*sources)
        compute = x.dtype
        flat_grad = grad_out.reshape(-1, grad_out.shape[-1]).to(compute)
        # Adapter gradients as autocast computes them for PEFT: a matmul in the compute dtype, cast to the weight's.
        grad_b = (flat_grad.T @ low).mul_(ctx.alpha).to(weight_b.dtype)
        grad_low = (flat_grad @ weight_b.to(compute)).mul_(ctx.alpha)
        positions = kept_positions[0].long() if kept_positions else None
        dropped = x if positions is None else _zero_at(x, positions)
        grad_a = (grad_low.T @ dropped.reshape(-1, x.shape[-1])).to(weight_a.dtype)
        grad_x = None
        if ctx.needs_input_grad[1]:
            # Written straight into a buffer with _zero_at's spare element: no second copy to zero the dropped ones.
            flat = torch.empty(x.numel() + 1, dtype=compute, device=x.device)
            torch.mm(grad_low, weight_a.to(compute), out=flat[:-1].view(-1, x.shape[-1]))
            if positions is not None:
                flat.index_fill_(0, positions, 0)
            grad_x = flat[:-1].view(x.shape)
        return grad_out, grad_x, grad_a, grad_b, None, None


def _lean_lora_forward(self: Any, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    result = self.base_layer(x, *args, **kwargs)
    if self.disable_adapters or self.merged:
        return result
    for name in self.active_adapters:
        if name not in self.lora_A:
            continue
        dropout = self.lora_dropout[name]
        rate = dropout.p if isinstance(dropout, nn.Dropout) and self.training else 0.0
        with torch.autocast(x.device.type, enabled=False):  # dtypes are handled explicitly above
            result = _LoraAdd.apply(result, x.to(result.dtype), self.lora_A[name].weight, self.lora_B[name].weight,
                                    self.scaling[name], rate)
    return result


class _GemmaRMSNorm(torch.autograd.Function):
    """(x / rms(x)) · (1 + w) in fp32, returned in x's dtype; keeps x and one scale per row."""

    # Backward in fewer passes than the formula reads (no `normed` tensor, one addcmul): norms were 13% of a reward
    # step on the Xeon.
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        rstd = _gemma_rstd(x, eps)
        ctx.save_for_backward(x, weight, rstd)
        return _gemma_normed(x, weight, rstd)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[Any, ...]:
        x, weight, rstd = ctx.saved_tensors
        xf = x.float()
        gain = 1.0 + weight.float()
        grad_weight = None
        if ctx.needs_input_grad[1]:
            grad_weight = (grad_out.float() * xf * rstd).reshape(-1, x.shape[-1]).sum(0).to(weight.dtype)
        gn = (grad_out * gain).float()  # one pass for bf16 (promoted to fp32); fp64 computes in fp32 as forward does
        # d/dx of x·r·gain with r = rsqrt(mean(x²) + eps): r·(gn − x·r²·mean(gn·x))
        # (not linalg.vecdot: autocast runs it in bf16)
        coefficient = (gn * xf).sum(-1, keepdim=True).mul_(rstd.square()).div_(-x.shape[-1])
        return torch.addcmul(gn, xf, coefficient).mul_(rstd).to(x.dtype), grad_weight, None


def _gemma_rstd(x: torch.Tensor, eps: float) -> torch.Tensor:
    return torch.rsqrt(x.float().square().mean(-1, keepdim=True).add_(eps))


def _gemma_normed(x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor) -> torch.Tensor:
    return (x.float() * rstd).mul_(1.0 + weight.float()).to(x.dtype)  # not in place: x.float() is x when x is fp32


def _gemma_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The norm's output again, as forward computed it (the same operations on the same tensors)."""
    return _gemma_normed(x, weight, _gemma_rstd(x, eps))


def _lean_gemma_norm_forward(self: Any, x: torch.Tensor) -> torch.Tensor:
    return _mark_recomputable(_GemmaRMSNorm.apply(x, self.weight, self.eps),
                              functools.partial(_gemma_norm, eps=self.eps), x, self.weight)


class _GatedGelu(torch.autograd.Function):
    """gelu_tanh(gate) · up, keeping gate and up (which the projections produce anyway), not the activation."""

    @staticmethod
    def forward(ctx: Any, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(gate, up)
        return _gated_gelu(gate, up)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[Any, ...]:
        gate, up = ctx.saved_tensors
        with torch.enable_grad():
            gate_ = gate.detach().requires_grad_(True)
            activated = torch.nn.functional.gelu(gate_, approximate="tanh")
            (grad_gate,) = torch.autograd.grad(activated, gate_, grad_out * up)
        return grad_gate, grad_out * activated.detach()


def _gated_gelu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.gelu(gate, approximate="tanh") * up


def _lean_gemma_mlp_forward(self: Any, x: torch.Tensor) -> torch.Tensor:
    gate, up = self.gate_proj(x), self.up_proj(x)
    return self.down_proj(_mark_recomputable(_GatedGelu.apply(gate, up), _gated_gelu, gate, up))


@dataclass(frozen=True)
class LeanReport:
    """What make_lean swapped, and how many adapted layers it had to leave to PEFT (DoRA, quantised bases)."""

    swapped: int
    skipped_adapters: int


def make_lean(model: nn.Module) -> LeanReport:
    """Swap in the lean forwards where they apply (plain LoRA linear layers, on a full-precision or 4-bit base; Gemma
    RMSNorms and MLPs)."""
    from peft.tuners.lora.layer import Linear as LoraLinear
    from peft.tuners.lora.layer import LoraLayer

    def plain_lora(module: nn.Module) -> bool:
        if module.lora_variant:  # DoRA and the like change the forward itself
            return False
        if isinstance(module, LoraLinear):
            return type(module.base_layer) is nn.Linear
        # QLoRA: PEFT's 4-bit layer differs from LoraLinear only in its base, called as a black box here.
        return type(module).__module__ == "peft.tuners.lora.bnb" and type(module.base_layer).__name__ == "Linear4bit"

    swapped = skipped = 0
    for module in model.modules():
        if isinstance(module, LoraLayer) and plain_lora(module):
            module.forward = types.MethodType(_lean_lora_forward, module)
            swapped += 1
        elif isinstance(module, LoraLayer):
            skipped += 1
        elif type(module).__name__ in ("Gemma3RMSNorm", "Gemma2RMSNorm", "GemmaRMSNorm"):
            module.forward = types.MethodType(_lean_gemma_norm_forward, module)
            swapped += 1
        elif type(module).__name__ == "Gemma3MLP" and getattr(module.config, "hidden_activation", None) == "gelu_pytorch_tanh":
            module.forward = types.MethodType(_lean_gemma_mlp_forward, module)
            swapped += 1
    return LeanReport(swapped, skipped)
