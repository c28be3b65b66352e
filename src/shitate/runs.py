"""The run folder: the only code that knows its layout.

    runs/<name>/
      recipe.yaml            the resolved recipe the run started with
      manifest.json          versions, data hashes and counts, facts about the run (merged as it goes)
      metrics.jsonl          one record a logged step, validation or in-training check
      loss.png               drawn from metrics.jsonl
      checkpoints/step-N/    trainable.safetensors, state.pt (optimizer, schedule, random states), progress.json
      reference_logps.json   dpo: each pair's log-probabilities under the reference, taken once before training
      adapter/ | model/      the final weights: a LoRA adapter, or a whole model for a full fine-tune
      eval/                  results.json, report.html, cached answers

Training, inference, evaluation and the CLI ask a RunFolder rather than joining paths, so
the layout can change in one place. Everything is written to a temporary name first and
renamed into place: a crash leaves the previous file or folder, never half of one.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml

from shitate import __version__
from shitate.config import Recipe, dump_recipe, resolved_recipe
from shitate.errors import ConfigError, ModelError

FINAL_KINDS = ("adapter", "model")


class RunFolder:
    """One training run's folder on disk."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunFolder({str(self.path)!r})"

    # --- what is there -------------------------------------------------------------------------
    @property
    def recipe_file(self) -> Path:
        return self.path / "recipe.yaml"

    @property
    def metrics_file(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def manifest_file(self) -> Path:
        return self.path / "manifest.json"

    @property
    def eval_dir(self) -> Path:
        return self.path / "eval"

    @property
    def loss_plot(self) -> Path:
        return self.path / "loss.png"

    def final_dir(self) -> Path | None:
        """adapter/ or model/ once the run has finished, else None."""
        found = [self.path / kind for kind in FINAL_KINDS if (self.path / kind).is_dir()]
        return found[0] if found else None

    def is_finished(self) -> bool:
        return self.recipe_file.is_file() and self.final_dir() is not None

    def is_started(self) -> bool:
        return self.recipe_file.is_file()

    def recipe(self) -> Recipe:
        """The recipe the run was made with (data files need not exist any more)."""
        from shitate.config import validate_recipe

        raw = yaml.safe_load(self.recipe_file.read_text(encoding="utf-8"))
        return validate_recipe(raw, source=str(self.recipe_file), check_files=False)

    def recipe_setting(self, key: str, default: Any = None) -> Any:
        """One top-level setting of the saved recipe, read without validating the rest."""
        raw = yaml.safe_load(self.recipe_file.read_text(encoding="utf-8")) or {}
        return raw.get(key, default)

    def system_prompt(self) -> str | None:
        """The system prompt the run trained with (its recipe's data.system), which its answers expect."""
        return (self.recipe_setting("data", {}) or {}).get("system")

    def unfinished_error(self) -> ModelError:
        return ModelError(f"{self.path}: this run has no final adapter yet (it did not finish). "
                          f"Resume it with `shitate train {self.recipe_file} --resume --out {self.path}`.")

    # --- starting and resuming -----------------------------------------------------------------
    def check_start(self, recipe: Recipe, resume: bool, force: bool) -> Path | None:
        """Whether the run may start (or resume) here, changing nothing; return the checkpoint to resume from."""
        if resume:
            if not self.recipe_file.is_file():
                raise ConfigError(f"{self.path}: nothing to resume (no recipe.yaml). Start the run without --resume.")
            before = yaml.safe_load(self.recipe_file.read_text(encoding="utf-8"))
            changed = sorted(_differences(before, resolved_recipe(recipe)))
            if changed:
                raise ConfigError(f"{self.path}: the recipe differs from the one this run started with "
                                  f"({', '.join(changed)}); a resumed run must use the same settings. "
                                  "Start a new run with --out, or --force to restart.")
            if self.final_dir() is not None:
                raise ConfigError(f"{self.path}: this run already finished. Use --force to train it again from the start.")
            return self.latest_checkpoint()
        if self.path.exists() and any(self.path.iterdir()) and not force:
            raise ConfigError(f"{self.path}: a run folder is already there. Continue it with --resume, "
                              "write elsewhere with --out DIR, or replace it with --force.")
        return None

    def create(self, recipe: Recipe) -> None:
        """Start the folder afresh with the resolved recipe (what was there is replaced: the caller checked --force)."""
        if self.path.exists():
            shutil.rmtree(self.path)
        self.path.mkdir(parents=True, exist_ok=True)
        _write_text_atomically(self.recipe_file, dump_recipe(recipe))

    # --- manifest and metrics ------------------------------------------------------------------
    def manifest(self) -> dict[str, Any]:
        return json.loads(self.manifest_file.read_text(encoding="utf-8")) if self.manifest_file.is_file() else {}

    def write_manifest(self, recipe: Recipe, **facts: Any) -> None:
        """manifest.json: versions, data hashes and counts, and facts about the run; merged on each call."""
        manifest = self.manifest()
        if not manifest:
            manifest = {"name": recipe.name, "stage": recipe.stage, "seed": recipe.train.seed, "versions": _versions(),
                        "data": _data_facts(recipe), "git_commit": _git_commit(), "host": platform.node(),
                        "started": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        manifest.update(facts)
        _write_text_atomically(self.manifest_file, json.dumps(manifest, indent=2, ensure_ascii=False))

    def append_metrics(self, record: dict[str, Any]) -> None:
        with self.metrics_file.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
            handle.flush()

    def metrics(self) -> list[dict[str, Any]]:
        if not self.metrics_file.is_file():
            return []
        records = []
        for line in self.metrics_file.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # the half line a killed process was appending: that step is redone after resume
        return records

    def validation_before_and_after(self) -> dict[str, dict[str, float]]:
        """First and last value of each validation statistic but the loss (val_*): read back from metrics.jsonl,
        so a resumed run keeps the "before" of its first life."""
        found: dict[str, dict[str, float]] = {}
        for record in self.metrics():
            for name, value in record.items():
                if name.startswith("val_") and name != "val_loss" and isinstance(value, (int, float)):
                    found.setdefault(name[4:], {"before": value})["after"] = value
        return found

    def forget_metrics_after(self, step: int) -> None:
        """On resume, drop what was logged after the checkpoint, so no step is logged twice."""
        kept = [r for r in self.metrics() if r.get("step", 0) <= step]
        _write_text_atomically(self.metrics_file, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in kept))

    def plot_loss(self, ylabel: str = "cross-entropy on the trained tokens") -> None:
        """Training loss per step and validation loss per evaluation, written atomically."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        records = self.metrics()
        train = [(r["step"], r["loss"]) for r in records if "loss" in r]
        validation = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
        figure, axis = plt.subplots(figsize=(7, 4))
        if train:
            axis.plot(*zip(*train), label="train loss", linewidth=1)
        if validation:
            axis.plot(*zip(*validation), "o-", label="validation loss")
        axis.set_xlabel("optimizer step")
        axis.set_ylabel(ylabel)
        axis.grid(alpha=0.3)
        axis.legend()
        figure.tight_layout()
        partial = self.loss_plot.with_suffix(".partial.png")
        figure.savefig(partial, dpi=110)
        plt.close(figure)
        os.replace(partial, self.loss_plot)

    # --- dpo's reference log-probabilities ------------------------------------------------------
    @property
    def reference_file(self) -> Path:
        return self.path / "reference_logps.json"

    def save_reference_logps(self, values: dict[str, list[list[float]]]) -> None:
        _write_text_atomically(self.reference_file, json.dumps(values))

    def reference_logps(self) -> dict[str, list[list[float]]] | None:
        return json.loads(self.reference_file.read_text(encoding="utf-8")) if self.reference_file.is_file() else None

    # --- checkpoints ---------------------------------------------------------------------------
    def checkpoints(self) -> list[Path]:
        """Finished checkpoints, oldest first (a half-written one has a temporary name and is not listed)."""
        folder = self.path / "checkpoints"
        if not folder.is_dir():
            return []
        found = [p for p in folder.iterdir() if p.is_dir() and p.name.startswith("step-") and p.name[5:].isdigit()]
        return sorted(found, key=lambda p: int(p.name[5:]))

    def latest_checkpoint(self) -> Path | None:
        found = self.checkpoints()
        return found[-1] if found else None

    def save_checkpoint(self, step: int, tensors: dict[str, Any], state: dict[str, Any], progress: dict[str, Any],
                        keep: int) -> Path:
        """Trained tensors (safetensors), resumable state (optimizer, schedule, random states) and progress."""
        import torch
        from safetensors.torch import save_file

        folder = self.path / "checkpoints"
        folder.mkdir(parents=True, exist_ok=True)
        target = folder / f"step-{step}"
        staging = Path(tempfile.mkdtemp(dir=folder, prefix=f".step-{step}."))
        try:
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(staging / "trainable.safetensors"))
            torch.save(state, staging / "state.pt")
            (staging / "progress.json").write_text(json.dumps({**progress, "step": step}, indent=2), encoding="utf-8")
            _sync(staging)  # on disk before the rename: after a power cut the name never points at empty files
            _replace_folder(staging, target)
            _sync_entry(folder)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        for old in self.checkpoints()[:-keep]:
            _remove_folder(old)
        return target

    def clear_leftovers(self) -> None:
        """Remove the temporary folders of writes a killed process never finished (SIGKILL skips every cleanup)."""
        for pattern in ("checkpoints/.step-*", *(f".{kind}.*" for kind in FINAL_KINDS)):
            for leftover in self.path.glob(pattern):
                shutil.rmtree(leftover, ignore_errors=True)

    @staticmethod
    def read_checkpoint(folder: Path) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
        """(trained tensors, resumable state, progress) of one checkpoint folder."""
        import torch
        from safetensors.torch import load_file

        tensors = load_file(str(folder / "trainable.safetensors"))
        # Our own file, written by save_checkpoint: optimizer state holds Python objects, so not weights_only.
        state = torch.load(folder / "state.pt", weights_only=False)
        progress = json.loads((folder / "progress.json").read_text(encoding="utf-8"))
        return tensors, state, progress

    # --- final weights -------------------------------------------------------------------------
    def publish_final(self, kind: str, write: Callable[[Path], None]) -> Path:
        """Write adapter/ or model/ through `write(folder)` into a temporary folder, then rename it into place."""
        if kind not in FINAL_KINDS:
            raise ValueError(f"final weights are one of {FINAL_KINDS}, not {kind!r}")
        target = self.path / kind
        staging = Path(tempfile.mkdtemp(dir=self.path, prefix=f".{kind}."))
        try:
            write(staging)
            _replace_folder(staging, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return target


def _replace_folder(staging: Path, target: Path) -> None:
    """Put `staging` in `target`'s place; the old folder is moved aside first and deleted after."""
    aside = _move_aside(target) if target.exists() else None
    os.replace(staging, target)
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)


def _remove_folder(folder: Path) -> None:
    shutil.rmtree(_move_aside(folder), ignore_errors=True)


def _move_aside(folder: Path) -> Path:
    """Rename a folder that is about to be deleted to a hidden name (which `clear_leftovers` sweeps): deleting it
    in place could be cut short by a kill, leaving a half-deleted folder under its own name — listed as a finished
    checkpoint, or taken for the final weights."""
    aside = folder.with_name(f".{folder.name}.old")
    shutil.rmtree(aside, ignore_errors=True)
    os.replace(folder, aside)
    return aside


def _sync(folder: Path) -> None:
    for file in folder.iterdir():
        with file.open("rb") as handle:
            os.fsync(handle.fileno())
    _sync_entry(folder)


def _sync_entry(folder: Path) -> None:
    """Make a folder's entries (a rename into it) durable."""
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def find_run(path: Path | str) -> RunFolder | None:
    """The run folder at `path` if it is one (started, finished or not), else None."""
    run = RunFolder(path)
    return run if run.path.is_dir() and run.is_started() else None


def _differences(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in a.keys() | b.keys() for d in _differences(a.get(k), b.get(k), f"{prefix}{k}.")]
    return [] if a == b else [prefix.rstrip(".")]


def _write_text_atomically(path: Path, text: str) -> None:
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(text, encoding="utf-8")
    os.replace(partial, path)


def file_digest(path: Path) -> str:
    """SHA-256 of a file, or of a folder's files in name order."""
    digest = hashlib.sha256()
    files = sorted(p for p in Path(path).rglob("*") if p.is_file()) if Path(path).is_dir() else [Path(path)]
    for file in files:
        with file.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def weight_digests(model_source: dict[str, Any]) -> dict[str, str]:
    """SHA-256 of each weight file of a local base model (a hub id has no files here to hash)."""
    folder = Path(model_source.get("folder", ""))
    if model_source.get("kind") == "hub" or not folder.is_dir():
        return {}
    return {str(f): file_digest(f) for f in sorted(folder.iterdir())
            if f.suffix in (".safetensors", ".gguf", ".bin", ".pt") and f.is_file()}


def audit(run: RunFolder) -> list[dict[str, Any]]:
    """Each file that made the run (data, base weights, final weights) with its recorded and current SHA-256:
    status ok, changed or missing."""
    manifest = run.manifest()
    rows = []

    def check(role: str, path: str, recorded: str) -> None:
        target = Path(path)
        status = "missing" if not target.exists() else "ok" if file_digest(target) == recorded else "changed"
        rows.append({"role": role, "path": path, "sha256": recorded, "status": status})

    for split, entries in (manifest.get("data") or {}).items():
        for entry in entries if isinstance(entries, list) else [entries]:
            check(f"data {split}", entry["path"], entry["sha256"])
    for path, digest in ((manifest.get("model_source") or {}).get("weights") or {}).items():
        check("base weights", path, digest)
    for kind, digest in (manifest.get("outputs") or {}).items():
        check(f"tuned {kind}", str(run.path / kind), digest)
    return rows


def _count_records(path: Path) -> int:
    if path.is_dir() or path.suffix.lower() not in (".jsonl", ".json"):
        return sum(1 for p in ([path] if path.is_file() else path.rglob("*")) if p.is_file())
    with path.open(encoding="utf-8", errors="replace") as handle:
        return sum(1 for line in handle if line.strip())


def _data_facts(recipe: Recipe) -> dict[str, Any]:
    facts: dict[str, Any] = {}
    for split, sources in recipe.data.files().items():
        entries = [{"path": str(s.path), "sha256": file_digest(s.path), "records": _count_records(s.path)}
                   for s in sources]
        facts[split] = entries if split == "train" and recipe.data.is_mixed() else entries[0]
    return facts


def _git_commit() -> str | None:
    try:
        # shitate's own checkout, not the user's working directory
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=False,
                             cwd=Path(__file__).parent)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def _versions() -> dict[str, str]:
    import peft
    import torch
    import transformers

    return {"shitate": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "peft": peft.__version__}
