"""Where a shitate training run spends its time on a GPU: torch's profiler and Python's over kids_qa runs.

Prints the Python functions with the most cumulative time in a whole run (loading, steps, validation,
checkpoints, saving), then, over three training steps, the ops with the most CPU time (Python and launches:
what a GPU waits on at small batches), the ops with the most GPU time, and the calls that make the host wait.

    python bench/gpu_profile.py --model FOLDER [--percall]   # --percall: as a CPU runs (bench side shitate-percall)
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import tempfile
from pathlib import Path
from typing import Any

import torch
import train_throughput as bench
from torch.profiler import ProfilerActivity, profile, schedule

PROFILED_STEPS = 3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--percall", action="store_true")
    args = parser.parse_args()
    bench.MODEL, bench.SETTINGS["epochs"] = args.model, args.epochs
    if args.percall:
        bench.use_cpu_choices()
    with tempfile.TemporaryDirectory() as folder:
        train, validation = bench.prepare_data("kids", Path(folder), 80, 30)
        bench.run_shitate(train, validation, Path(folder) / "warm", text=False)  # one-off kernel loading
        # Python's profile of a whole run first, printed at once: a lease's time limit may cut what follows.
        python_profile = cProfile.Profile()
        python_profile.enable()
        python_figures = bench.run_shitate(train, validation, Path(folder) / "python", text=False)
        python_profile.disable()
        print(f"Python's profiler: {python_figures['tokens_per_s']:.1f} tokens/s, wall {python_figures['wall_s']:.1f} s")
        table = io.StringIO()
        pstats.Stats(python_profile, stream=table).sort_stats("cumulative").print_stats(60)
        print(table.getvalue(), flush=True)
        # torch's profiler over a few training steps only (after two untimed ones): summarising a whole run's
        # events took longer than a lease had left.
        from shitate.train import loop

        train_step = loop.train_step
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA],
                     schedule=schedule(wait=1, warmup=1, active=PROFILED_STEPS, repeat=1)) as prof:
            def profiled_step(*step_args: Any, **step_kwargs: Any) -> Any:
                result = train_step(*step_args, **step_kwargs)
                prof.step()
                return result

            loop.train_step = profiled_step
            figures = bench.run_shitate(train, validation, Path(folder) / "profiled", text=False)
            loop.train_step = train_step
    print(f"profiled run: {figures['tokens_per_s']:.1f} tokens/s (slowed by the profiler); {PROFILED_STEPS} steps profiled")
    averages = prof.key_averages()
    print(averages.table(sort_by="self_cpu_time_total", row_limit=30, max_name_column_width=60))
    print(averages.table(sort_by="self_cuda_time_total", row_limit=20, max_name_column_width=60))
    waits = [a for a in averages if any(w in a.key for w in ("Synchronize", "aten::item", "aten::nonzero",
                                                               "aten::_local_scalar_dense", "cudaMemcpy"))]
    for average in waits:
        print(f"{average.key}: {average.count} calls, {average.self_cpu_time_total / 1e3:.1f} ms self CPU")

if __name__ == "__main__":
    if not torch.cuda.is_available():
        raise SystemExit("gpu_profile.py profiles the CUDA path; this machine has no CUDA GPU")
    main()
