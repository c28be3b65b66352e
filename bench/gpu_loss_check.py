"""The blocked loss (models/logprobs.py) on this machine's accelerator: does it agree with the plain loss, and which
block sizes are fastest?

At the default model's shape (640 features, 262,144 words) it checks the loss and the gradients of the hidden states
and of the output layer against cross-entropy on materialised logits (fp64 reference; bf16 against bf16 logits as
autocast gives them), then times forward + backward and the peak accelerator memory for the plain loss and for the
blocked one over a grid of row chunks and vocabulary blocks. Prints one line per figure.

    python bench/gpu_loss_check.py [--rows 2048] [--device cuda]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from shitate.models import logprobs
from shitate.models.logprobs import linear_cross_entropy


def plain_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, softcap: float | None) -> torch.Tensor:
    logits = (hidden @ weight.T).float()
    if softcap:
        logits = softcap * torch.tanh(logits / softcap)
    return F.cross_entropy(logits, targets, reduction="sum")


def worst_relative(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double() - want.double()).abs().max() / want.double().abs().max().clamp_min(1e-30))


def check_agreement(rows: int, vocab: int, width: int, device: str) -> None:
    for softcap in (None, 30.0):
        generator = torch.Generator(device="cpu").manual_seed(0)
        hidden = (torch.randn(rows, width, generator=generator) * 2).to(device)
        weight = (torch.randn(vocab, width, generator=generator) * 0.05).to(device)
        targets = torch.randint(0, vocab, (rows,), generator=generator).to(device)
        # fp64 reference of the fp32 computation, with the output layer's gradient (full fine-tuning)
        h64, w64 = hidden.double().requires_grad_(), weight.double().requires_grad_()
        reference = plain_loss(h64, w64, targets, softcap)
        ref_h, ref_w = torch.autograd.grad(reference, [h64, w64])
        del h64, w64
        h32, w32 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        ours = linear_cross_entropy(h32, w32, targets, compute_dtype=torch.float32, softcap=softcap)
        got_h, got_w = torch.autograd.grad(ours, [h32, w32])
        print(f"fp32 softcap={softcap}: loss {ours.item():.6f} vs fp64 {reference.item():.6f} "
              f"(relative {abs(ours.item() - reference.item()) / reference.item():.1e}); "
              f"grad h worst {worst_relative(got_h, ref_h):.1e}, grad W worst {worst_relative(got_w, ref_w):.1e}",
              flush=True)
        del ref_w, got_w
        # bf16 as training runs it: bf16 matmul, fp32 softmax, against autocast's plain loss on the same inputs
        h16 = hidden.bfloat16().requires_grad_()
        w16 = weight.bfloat16()
        expected = plain_loss(h16, w16, targets, softcap)
        (expected_h,) = torch.autograd.grad(expected, [h16])
        h16b = hidden.bfloat16().requires_grad_()
        ours16 = linear_cross_entropy(h16b, w16, targets, compute_dtype=torch.bfloat16, softcap=softcap)
        (got16_h,) = torch.autograd.grad(ours16, [h16b])
        print(f"bf16 softcap={softcap}: loss {ours16.item():.4f} vs plain bf16 {expected.item():.4f} "
              f"(relative {abs(ours16.item() - expected.item()) / expected.item():.1e}); "
              f"grad h worst {worst_relative(got16_h, expected_h):.1e}; vs fp64 loss "
              f"{abs(ours16.item() - reference.item()) / reference.item():.1e}", flush=True)


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(step: Callable[[], None], device: str, repeats: int) -> tuple[float, float | None]:
    """Median seconds of `step()` and its peak accelerator memory above what was allocated before, in GB."""
    step()  # warm-up: kernel selection, allocator
    synchronize(device)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        synchronize(device)
        seconds.append(time.perf_counter() - start)
    peak = (torch.cuda.max_memory_allocated() - before) / 1e9 if device.startswith("cuda") else None
    return sorted(seconds)[len(seconds) // 2], peak


def time_grid(rows: int, vocab: int, width: int, device: str, repeats: int) -> None:
    generator = torch.Generator(device="cpu").manual_seed(1)
    hidden = torch.randn(rows, width, generator=generator).to(device, torch.bfloat16).requires_grad_()
    weight = (torch.randn(vocab, width, generator=generator) * 0.05).to(device, torch.bfloat16)
    targets = torch.randint(0, vocab, (rows,), generator=generator).to(device)

    def plain() -> None:
        plain_loss(hidden, weight, targets, None).backward()

    seconds, peak = timed(plain, device, repeats)
    memory = f" at {peak:.2f} GB" if peak is not None else ""
    print(f"plain (bf16 logits materialised), {rows} rows: {seconds * 1e3:.1f} ms{memory}", flush=True)
    # The block constant this device reads (a CPU has its own, smaller one).
    constant = "_BLOCK_ELEMENTS" if torch.device(device).type == "cpu" else "_GPU_BLOCK_ELEMENTS"
    chunk_default, block_default = logprobs.loss_chunk_rows(device), getattr(logprobs, constant)
    try:
        for chunk in (512, 1024, 2048, 4096):
            for block_elements in (block_default // 4, block_default // 2, block_default, block_default * 2):
                if chunk > rows and chunk != 512:
                    continue
                setattr(logprobs, constant, block_elements)

                def blocked(chunk: int = chunk) -> None:
                    linear_cross_entropy(hidden, weight, targets, chunk_size=chunk,
                                         compute_dtype=torch.bfloat16).backward()

                seconds, peak = timed(blocked, device, repeats)
                memory = f" at {peak:.2f} GB" if peak is not None else ""
                mark = "  (default)" if (chunk, block_elements) == (chunk_default, block_default) else ""
                words = min(vocab, block_elements // min(chunk, rows))
                print(f"blocked chunk {chunk} rows, block {words} words: "
                      f"{seconds * 1e3:.1f} ms{memory}{mark}", flush=True)
    finally:
        setattr(logprobs, constant, block_default)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--rows", type=int, default=2048, help="labelled positions in a batch")
    parser.add_argument("--vocab", type=int, default=262_144)
    parser.add_argument("--width", type=int, default=640)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU"
    print(f"device {name}, torch {torch.__version__}", flush=True)
    check_agreement(min(args.rows, 1024), args.vocab, args.width, args.device)
    for rows in sorted({args.rows // 4, args.rows}):
        time_grid(rows, args.vocab, args.width, args.device, args.repeats)


if __name__ == "__main__":
    main()
