"""metrics.jsonl (appended as training goes) and loss.png (redrawn from it)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def append_metrics(path: Path, record: dict[str, Any]) -> None:
    with path.open("a", encoding="utf-8") as handle:
        handle.write(json.dumps(record, ensure_ascii=False) + "\n")
        handle.flush()


def read_metrics(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def truncate_metrics(path: Path, last_step: int) -> None:
    """On resume, forget what was logged after the checkpoint, so steps are not logged twice."""
    kept = [r for r in read_metrics(path) if r.get("step", 0) <= last_step]
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in kept), encoding="utf-8")


def plot_loss(metrics_path: Path, out: Path) -> None:
    """Training loss per step and validation loss per epoch, written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(metrics_path)
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    validation = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    figure, axis = plt.subplots(figsize=(7, 4))
    if train:
        axis.plot(*zip(*train), label="train loss", linewidth=1)
    if validation:
        axis.plot(*zip(*validation), "o-", label="validation loss")
    axis.set_xlabel("optimizer step")
    axis.set_ylabel("cross-entropy on answer tokens")
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    partial = out.with_suffix(".partial.png")
    figure.savefig(partial, dpi=110)
    plt.close(figure)
    os.replace(partial, out)
