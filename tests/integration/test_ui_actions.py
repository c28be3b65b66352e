"""What the web UI's buttons do, without a browser (test_ui.py drives the page where Chromium is installed):
Stop and Resume of a training run, and chat answers that stream into both panes."""

from __future__ import annotations

import time

import pytest
from test_train import make_recipe

from conftest import kids_records

pytest.importorskip("gradio")


def test_stop_saves_a_checkpoint_and_resume_finishes_the_run(tmp_path, tiny_model):
    from shitate.config import load_recipe
    from shitate.runs import RunFolder
    from shitate.serve.ui import TrainingJob

    recipe = load_recipe(make_recipe(tmp_path, tiny_model), ["train.epochs=40"])  # 120 steps: long enough to stop
    job, run = TrainingJob(), tmp_path / "run"
    assert job.stop() == "学習中ではありません / No training is running."
    job.start(recipe, run)
    deadline = time.monotonic() + 120
    while not RunFolder(run).metrics() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "Stopping after this step" in job.stop()
    job.thread.join(timeout=120)
    state, _ = job.progress()
    assert job.error is None and job.stopped and state.startswith("停止 / Stopped at step"), state
    stopped_at = int(RunFolder(run).latest_checkpoint().name[5:])
    assert 0 < stopped_at < 120 and RunFolder(run).final_dir() is None

    assert job.resume().startswith("再開しました / Resumed")
    job.thread.join(timeout=300)
    state, curve = job.progress()
    assert job.error is None and state.startswith("完了 / Done: 120 steps"), state
    assert sorted(curve[curve["kind"] == "train"]["step"]) == list(range(1, 121))
    assert job.resume() == "再開できる停止中の学習はありません / No stopped run to resume."


def test_chat_streams_each_answer_into_its_pane(tiny_model):
    from shitate.config import GenerateSpec
    from shitate.models.inference import answer, load_for_inference
    from shitate.serve.ui import stream_both

    model = load_for_inference(str(tiny_model))
    question = kids_records(1)[0]["messages"][0]["content"]
    updates = list(stream_both(question, [], [], model, model, system=None))
    expected = answer(model, [[{"role": "user", "content": question}]], GenerateSpec(max_new_tokens=64))[0].strip()
    base_pane, tuned_pane, cleared = updates[-1]
    assert cleared == "" and base_pane[-1]["content"] == tuned_pane[-1]["content"] == expected and expected
    # The base pane filled piece by piece before the tuned one began.
    partial = [update[0][-1]["content"] for update in updates]
    assert len(updates) > 3 and any(0 < len(text) < len(expected) for text in partial)
    assert updates[0][1][-1]["content"] == ""
