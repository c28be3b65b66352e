"""The run folder's checkpoints stay whole when a process dies in the middle of writing or pruning them."""
import shutil

import pytest
import torch

from shitate.runs import RunFolder


class Killed(BaseException):
    """Stands in for SIGKILL: nothing after it runs, not even `except Exception` handlers."""


def _save(run: RunFolder, step: int, keep: int = 2) -> None:
    run.save_checkpoint(step, {"w": torch.full((2, 2), float(step))}, {"step": step}, {"epoch": 0}, keep=keep)


def test_a_kill_while_pruning_an_old_checkpoint_never_leaves_a_half_deleted_one_listed(tmp_path, monkeypatch):
    run = RunFolder(tmp_path / "run")
    _save(run, 1)
    _save(run, 2)
    real_rmtree = shutil.rmtree

    def die_half_way(path, *args, **kwargs):
        files = sorted(p for p in path.iterdir()) if path.is_dir() else []
        if files:  # delete one file of the pruned checkpoint, then the process is gone
            files[0].unlink()
            raise Killed
        real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr("shitate.runs.shutil.rmtree", die_half_way)
    with pytest.raises(Killed):
        _save(run, 3)  # keep=2: step-1 is pruned, and the kill lands in that deletion
    monkeypatch.setattr("shitate.runs.shutil.rmtree", real_rmtree)

    assert [p.name for p in run.checkpoints()] == ["step-2", "step-3"]
    for checkpoint in run.checkpoints():
        tensors, state, _ = RunFolder.read_checkpoint(checkpoint)
        assert tensors["w"][0, 0].item() == state["step"]
    run.clear_leftovers()
    assert sorted(p.name for p in (run.path / "checkpoints").iterdir()) == ["step-2", "step-3"]


def test_pruning_keeps_the_newest_checkpoints(tmp_path):
    run = RunFolder(tmp_path / "run")
    for step in range(1, 6):
        _save(run, step, keep=3)
    assert [p.name for p in run.checkpoints()] == ["step-3", "step-4", "step-5"]
    assert run.latest_checkpoint() == run.path / "checkpoints" / "step-5"
