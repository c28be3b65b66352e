"""Checkpoints that survive a crash: written to a temp folder, then renamed into place."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    """Finished checkpoints, oldest first."""
    folder = run_dir / "checkpoints"
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.is_dir() and p.name.startswith("step-") and p.name[5:].isdigit()]
    return sorted(found, key=lambda p: int(p.name[5:]))


def save_checkpoint(run_dir: Path, step: int, trainable: dict[str, torch.Tensor], optimizer: Any, scheduler: Any,
                    state: dict[str, Any], keep: int) -> Path:
    """Save everything needed to continue exactly from `step`; keep the newest `keep` checkpoints."""
    folder = run_dir / "checkpoints"
    folder.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=folder, prefix=f".step-{step}."))
    try:
        save_file({k: v.contiguous() for k, v in trainable.items()}, str(staging / "trainable.safetensors"))
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "torch_rng": torch.get_rng_state()}, staging / "optimizer.pt")
        (staging / "state.json").write_text(json.dumps({**state, "step": step}, indent=2), encoding="utf-8")
        target = folder / f"step-{step}"
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    for old in checkpoint_dirs(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return target


def load_checkpoint(folder: Path, model: Any, optimizer: Any, scheduler: Any) -> dict[str, Any]:
    """Restore weights, optimizer, schedule and random state; return the saved progress state."""
    tensors = load_file(str(folder / "trainable.safetensors"))
    parameters = dict(model.named_parameters())
    missing = [name for name in tensors if name not in parameters]
    if missing:
        raise RuntimeError(f"{folder}: checkpoint tensors {missing[:3]} are not in the model")
    with torch.no_grad():
        for name, tensor in tensors.items():
            parameters[name].copy_(tensor)
    extra = torch.load(folder / "optimizer.pt", weights_only=False)
    optimizer.load_state_dict(extra["optimizer"])
    scheduler.load_state_dict(extra["scheduler"])
    torch.set_rng_state(extra["torch_rng"])
    return json.loads((folder / "state.json").read_text(encoding="utf-8"))
