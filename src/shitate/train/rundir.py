"""The run folder: created once, never overwritten without --force, self-describing."""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import subprocess
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml

from shitate import __version__
from shitate.config import Recipe, dump_recipe
from shitate.errors import ConfigError
from shitate.train.checkpoints import checkpoint_dirs


def prepare(run_dir: Path, recipe: Recipe, resume: bool, force: bool) -> Path | None:
    """Create or reopen a run folder; return the checkpoint to resume from, if any."""
    if resume:
        saved = run_dir / "recipe.yaml"
        if not saved.is_file():
            raise ConfigError(f"{run_dir}: nothing to resume (no recipe.yaml). Start the run without --resume.")
        before = yaml.safe_load(saved.read_text(encoding="utf-8"))
        now = recipe.model_dump(mode="json")
        changed = sorted(_diff(before, now))
        if changed:
            raise ConfigError(f"{run_dir}: the recipe differs from the one this run started with ({', '.join(changed)}); "
                              "a resumed run must use the same settings. Start a new run with --out, or --force to restart.")
        if (run_dir / "adapter").is_dir() or (run_dir / "model").is_dir():
            raise ConfigError(f"{run_dir}: this run already finished. Use --force to train it again from the start.")
        checkpoints = checkpoint_dirs(run_dir)
        return checkpoints[-1] if checkpoints else None
    if run_dir.exists() and any(run_dir.iterdir()):
        if not force:
            raise ConfigError(f"{run_dir}: a run folder is already there. Continue it with --resume, "
                              "write elsewhere with --out DIR, or replace it with --force.")
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "recipe.yaml").write_text(dump_recipe(recipe), encoding="utf-8")
    return None


def _diff(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in a.keys() | b.keys() for d in _diff(a.get(k), b.get(k), f"{prefix}{k}.")]
    return [] if a == b else [prefix.rstrip(".")]


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def versions() -> dict[str, str]:
    import peft
    import torch
    import transformers

    return {"shitate": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "peft": peft.__version__}


def write_manifest(run_dir: Path, recipe: Recipe, **facts: Any) -> None:
    """manifest.json: versions, data hashes and counts, and facts about the run; merged on each call."""
    path = run_dir / "manifest.json"
    manifest = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    if not manifest:
        data = {}
        for split in ("train", "validation", "test"):
            file = getattr(recipe.data, split)
            if file is not None:
                data[split] = {"path": str(file), "sha256": file_digest(file),
                               "records": sum(1 for line in Path(file).open(encoding="utf-8") if line.strip())}
        manifest = {"name": recipe.name, "stage": recipe.stage, "seed": recipe.train.seed, "versions": versions(),
                    "data": data, "git_commit": _git_commit(), "host": platform.node(),
                    "started": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    manifest.update(facts)
    partial = path.with_suffix(".partial")
    partial.write_text(json.dumps(manifest, indent=2, ensure_ascii=False), encoding="utf-8")
    os.replace(partial, path)
