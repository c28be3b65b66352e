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


def test_stop_pressed_while_the_model_loads_stops_after_the_first_step(tmp_path, tiny_model):
    from shitate.config import load_recipe
    from shitate.runs import RunFolder
    from shitate.serve.ui import TrainingJob

    job, run = TrainingJob(), tmp_path / "run"
    job.start(load_recipe(make_recipe(tmp_path, tiny_model), ["train.epochs=40"]), run)
    assert "Stopping after this step" in job.stop() and not RunFolder(run).metrics()
    job.thread.join(timeout=300)
    assert job.stopped and RunFolder(run).latest_checkpoint().name == "step-1", job.error


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


def test_a_question_past_the_models_positions_is_answered_with_why_in_its_pane(tmp_path, tokenizer):
    from test_cli import tiny_gpt2

    from shitate.models.inference import load_for_inference
    from shitate.serve.ui import stream_both

    model = load_for_inference(str(tiny_gpt2(tmp_path / "gpt2", tokenizer, positions=32)), template="gemma")
    base_pane, tuned_pane, _ = list(stream_both("なんで空は青いの?" * 6, [], [], model, model, system=None))[-1]
    assert "learned positions for 32 tokens only" in base_pane[-1]["content"]
    assert tuned_pane[-1]["content"] == base_pane[-1]["content"]


def test_a_chat_left_mid_answer_stops_generating(tiny_model):
    """A closed page or Ctrl-C in `shitate chat` stops the answer: no thread generates on (one still inside torch
    when Python exits aborts the interpreter)."""
    import threading

    from shitate.config import GenerateSpec
    from shitate.models.inference import load_for_inference, stream_answer

    model = load_for_inference(str(tiny_model))
    before = set(threading.enumerate())
    stream = stream_answer(model, [{"role": "user", "content": "なんで空は青いの?"}],
                           GenerateSpec(max_new_tokens=2000))
    assert next(stream) and set(threading.enumerate()) - before  # the answer is being written
    stream.close()
    assert not set(threading.enumerate()) - before  # (threads that ended meanwhile, a progress bar's, do not count)


def test_quitting_the_ui_mid_run_stops_training_with_a_checkpoint(tmp_path, tiny_model):
    """Ctrl-C on `shitate ui` while it trains: Python exits cleanly after the step, and the run can resume."""
    import subprocess
    import sys

    from shitate.runs import RunFolder

    run = tmp_path / "run"
    script = f"""
import time
from shitate.config import load_recipe
from shitate.runs import RunFolder
from shitate.serve.ui import TrainingJob
job = TrainingJob()
job.start(load_recipe({str(make_recipe(tmp_path, tiny_model))!r}, ["train.epochs=40"]), {str(run)!r})
while not RunFolder({str(run)!r}).metrics():
    time.sleep(0.05)
"""  # and the interpreter exits, with the training thread mid-run
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0 and "terminate called" not in done.stderr, done.stderr[-2000:]
    steps = [record["step"] for record in RunFolder(run).metrics() if "loss" in record]
    assert RunFolder(run).latest_checkpoint() is not None and RunFolder(run).final_dir() is None
    assert 0 < max(steps) < 120


def test_python_exits_cleanly_while_a_thread_is_generating(tiny_model):
    """The UI's Evaluate button generates in a daemon thread: quitting the UI then must not abort the interpreter
    (torch mid-op at teardown: SIGABRT), and the thread must get an error, not a cut-off answer."""
    import subprocess
    import sys

    script = f"""
import threading, time
from shitate.config import GenerateSpec
from shitate.models.inference import answer, load_for_inference
loaded = load_for_inference({str(tiny_model)!r})
def evaluate():
    try:
        answer(loaded, [[{{"role": "user", "content": "なんで空は青いの?"}}]] * 4, GenerateSpec(max_new_tokens=5000))
        print("finished", flush=True)
    except Exception as error:
        print(type(error).__name__, flush=True)
threading.Thread(target=evaluate, daemon=True).start()
time.sleep(2)
"""  # and the interpreter exits with the thread inside generate
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0 and "terminate called" not in done.stderr, done.stderr[-2000:]
    assert done.stdout.split() == ["StoppedAtExit"]


def _tensors_in(value, depth=0):
    """How many tensors value is, or holds in a mapping (a tokenizer's BatchEncoding too) or a list, a few levels deep."""
    from collections.abc import Mapping

    import torch

    if isinstance(value, torch.Tensor):
        return 1
    items = value.values() if isinstance(value, Mapping) else value if isinstance(value, list | tuple) else ()
    return sum(_tensors_in(item, depth + 1) for item in items) if depth < 3 else 0


def test_a_streaming_answer_leaves_no_tensor_with_its_reader(tiny_model):
    """The reader of a streamed answer is a daemon thread nobody waits for at exit; a tensor it held would be freed as
    the interpreter tears down, inside torch's C++, and abort the process (exit −6, about one exit in ten before the
    prompt's tensors went with the worker). So while the answer streams, the reader's frame holds none."""
    import torch

    from shitate.config import GenerateSpec
    from shitate.models.inference import load_for_inference, stream_answer

    loaded = load_for_inference(str(tiny_model))
    piece = torch.tensor([loaded.tokenizer.encode("そら", add_special_tokens=False)])

    def endless_generate(input_ids, streamer, stopping_criteria, **kwargs):
        streamer.put(input_ids)  # the prompt, which the streamer skips
        while not any(bool(stop(input_ids, None).all()) for stop in stopping_criteria):
            streamer.put(piece)
            time.sleep(0.01)
        streamer.end()

    loaded.model.generate = endless_generate
    stream = stream_answer(loaded, [{"role": "user", "content": "なんで空は青いの?"}], GenerateSpec())
    assert "そら" in next(stream)

    held = {name: value for name, value in stream.gi_frame.f_locals.items() if _tensors_in(value)}
    stream.close()  # stops the answer and joins its worker
    assert not held, f"the reader holds tensors in {sorted(held)}"


def test_a_failing_answer_raises_its_error_in_the_reader_instead_of_leaving_it_waiting(tiny_model):
    import threading
    import traceback

    from shitate.config import GenerateSpec
    from shitate.models.inference import load_for_inference, stream_answer

    loaded = load_for_inference(str(tiny_model))

    def broken_generate(**kwargs):
        raise ValueError("the model refused")

    loaded.model.generate = broken_generate
    outcome: list[object] = []

    def read():
        try:
            outcome.append(list(stream_answer(loaded, [{"role": "user", "content": "なんで空は青いの?"}], GenerateSpec())))
        except ValueError as error:
            outcome.append(error)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(timeout=60)
    assert not reader.is_alive(), "the reader still waits for an answer that failed"
    assert [str(item) for item in outcome] == ["the model refused"]
    # Nor does the error bring the prompt's tensors to the reader in its traceback's frames (see the test above).
    held = [(frame.f_code.co_name, name) for frame, _ in traceback.walk_tb(outcome[0].__traceback__)
            for name, value in frame.f_locals.items() if _tensors_in(value)]
    assert not held, f"the error's frames hold tensors: {held}"


def test_python_exit_stops_a_streaming_answer_instead_of_waiting_for_it(tiny_model):
    """The UI streams chat answers from a worker thread: quitting mid-answer must stop that answer — neither abort
    (a thread started from the web server's daemon thread is a daemon too, and one inside torch at teardown aborted
    the interpreter: exit −6) nor wait for all of it (this model never ends an answer by itself)."""
    import subprocess
    import sys

    script = f"""
import threading, time
import torch
from shitate.config import GenerateSpec
from shitate.models.inference import load_for_inference, stream_answer
loaded = load_for_inference({str(tiny_model)!r})
def endless_generate(input_ids, streamer, stopping_criteria, **kwargs):
    ids = input_ids
    while not any(bool(stop(ids, None).all()) for stop in stopping_criteria):
        ids = torch.cat([ids, ids[:, -1:]], dim=1)
        streamer.put(ids[:, -1:])
        time.sleep(0.01)
    print("stopped after", ids.shape[1] - input_ids.shape[1], "tokens", flush=True)
    streamer.end()
loaded.model.generate = endless_generate
def chat():  # as the UI's handler reads the stream, in a daemon thread of the web server
    for _ in stream_answer(loaded, [{{"role": "user", "content": "なんで空は青いの?"}}], GenerateSpec()):
        pass
threading.Thread(target=chat, daemon=True).start()
time.sleep(2)
"""  # and the interpreter exits while the answer streams
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert done.stdout.startswith("stopped after"), done.stdout
