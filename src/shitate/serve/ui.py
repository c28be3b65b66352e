"""`shitate ui`: the whole loop in a browser (Gradio), for colleagues who do not use terminals.

Check a data file, train a recipe with a live loss curve, evaluate the run, and chat with the
base and the tuned model side by side. Every button calls the function the command line calls
(`shitate.workflow`, `models.inference`); training progress is read from the run folder's
metrics.jsonl — the same event log `shitate train` writes — so the page shows what the terminal shows.
Labels are Japanese and English. Nothing is fetched from outside: Gradio's analytics are off and
the theme uses the system's fonts.
"""

from __future__ import annotations

import atexit
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

# Before gradio is imported: no usage reporting, no version check.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


class TrainingJob:
    """One training run in a background thread; its progress is whatever its run folder says."""

    def __init__(self) -> None:
        self.thread: threading.Thread | None = None
        self.run: Path | None = None
        self.recipe: Any = None
        self.error: str | None = None
        self.stopped: str | None = None
        atexit.register(self._stop_at_exit)

    def running(self) -> bool:
        return self.thread is not None and self.thread.is_alive()

    def start(self, recipe: Any, out: Path, resume: bool = False) -> None:
        from shitate.errors import TrainingInterrupted
        from shitate.train.session import forget_stop_request
        from shitate.workflow import train_recipe

        if self.running():
            raise RuntimeError("a training run is already going; stop it or wait for it to finish")
        forget_stop_request()
        self.run, self.recipe, self.error, self.stopped = out, recipe, None, None

        def work() -> None:
            try:
                train_recipe(recipe, out=out, resume=resume, force=not resume)
            except TrainingInterrupted as stopped:  # the Stop button: a checkpoint was saved
                self.stopped = str(stopped)
            except Exception as err:  # noqa: BLE001 — shown on the page, as the terminal would print it
                self.error = str(err)

        # A daemon, so closing the UI never waits for a whole run; but one still inside torch when Python exits
        # aborts the interpreter, so at exit the run stops after its step with a checkpoint, as the Stop button does.
        self.thread = threading.Thread(target=work, daemon=True)
        self.thread.start()

    def _stop_at_exit(self) -> None:
        self.stop()
        if self.thread is not None:
            self.thread.join()

    def stop(self) -> str:
        """Stop after the current step, with a checkpoint, as Ctrl-C does in the terminal."""
        from shitate.train.session import request_stop

        if not self.running():
            return "学習中ではありません / No training is running."
        request_stop()
        return "このステップの後で止めます / Stopping after this step (a checkpoint is saved)…"

    def resume(self) -> str:
        if self.running() or self.run is None or self.stopped is None:
            return "再開できる停止中の学習はありません / No stopped run to resume."
        self.start(self.recipe, self.run, resume=True)
        return f"再開しました / Resumed: {self.run}"

    def progress(self) -> tuple[str, Any]:
        """(status line, loss table) from the run folder."""
        import pandas as pd

        from shitate.runs import RunFolder

        empty = pd.DataFrame({"step": [], "loss": [], "kind": []})
        if self.run is None:
            return "まだ学習していません / Not started", empty
        folder = RunFolder(self.run)
        records = folder.metrics()
        rows = [{"step": r["step"], "loss": r["loss"], "kind": "train"} for r in records if "loss" in r]
        rows += [{"step": r["step"], "loss": r["val_loss"], "kind": "validation"} for r in records if "val_loss" in r]
        total = folder.manifest().get("total_steps", "?")
        done = max((r["step"] for r in rows if r["kind"] == "train"), default=0)
        if self.error:
            state = f"エラー / Error: {self.error}"
        elif self.stopped and not self.running():
            state = f"停止 / Stopped at step {done} / {total}; checkpoint saved — 再開 / Resume continues it"
        elif self.running():
            state = f"学習中 / Training: step {done} / {total}"
        else:
            state = f"完了 / Done: {done} steps — {self.run}"
        return state, pd.DataFrame(rows) if rows else empty


def build(base: str, tuned: str | None = None, recipes: list[Path] | None = None, runs_dir: Path = Path("runs")) -> Any:
    """The Gradio app. `base` and `tuned` are what the chat tab compares; training sets `tuned` to its run."""
    import gradio as gr

    from shitate.config import load_recipe
    from shitate.models.inference import load_for_inference
    from shitate.progress import counted
    from shitate.runs import RunFolder
    from shitate.workflow import check_data, evaluate_target

    job = TrainingJob()
    models: dict[str, Any] = {}
    state = {"tuned": tuned}

    def loaded(reference: str) -> Any:
        if reference not in models:
            models[reference] = load_for_inference(reference)
        return models[reference]

    def run_check(file: Any, model: str) -> str:
        if file is None:
            return "ファイルを選んでください / Choose a file first."
        report, kind = check_data(Path(file), model or None)
        noun = {"chats": "conversation", "pairs": "pair", "text": "document"}[kind]
        lines = [f"**{Path(file).name}**: {counted(report.records, 'valid ' + noun)}, "
                 f"{counted(len(report.errors), 'error')}, {counted(len(report.warnings), 'warning')}, "
                 f"{report.duplicates} repeated."]
        lines += [f"- ❌ {p}" for p in report.errors[:50]] + [f"- ⚠️ {p}" for p in report.warnings[:50]]
        if report.lengths:
            lines.append(f"\ntokens per example: min {min(report.lengths)}, max {max(report.lengths)}, "
                         f"total {sum(report.lengths)}")
        return "\n".join(lines)

    def run_train(recipe_path: str, data_file: Any, steps: float) -> str:
        overrides = [f"train.max_steps={int(steps)}"] if steps else []
        if data_file is not None:
            overrides.append(f"data.train={data_file}")
        recipe = load_recipe(Path(recipe_path), overrides)
        out = runs_dir / f"{recipe.name}-ui-{time.strftime('%Y%m%d-%H%M%S')}"
        job.start(recipe, out.resolve())
        state["tuned"] = str(out.resolve())
        limit = f" — 最大 {int(steps)} ステップ / at most {int(steps)} steps" if steps else ""
        return f"開始しました / Started: {out}{limit}"

    def run_eval() -> str:
        if job.run is None or (job.thread and job.thread.is_alive()):
            return "学習が終わってから / After training has finished."
        out = evaluate_target(str(job.run))
        return f"レポート / Report: {out / 'report.html'}\n\n" + (out / "results.json").read_text(encoding="utf-8")[:4000]

    def run_chat(message: str, base_history: list, tuned_history: list) -> Iterator[tuple[list, list, str]]:
        # Both sides get the tuned run's system prompt, as `shitate compare` gives them.
        system = None
        if state["tuned"] and RunFolder(state["tuned"]).recipe_file.is_file():
            system = RunFolder(state["tuned"]).system_prompt()
        tuned_model = loaded(state["tuned"]) if state["tuned"] else None
        yield from stream_both(message, base_history, tuned_history, loaded(base), tuned_model, system)

    with gr.Blocks(title="shitate 仕立て") as app:
        gr.Markdown("# shitate 仕立て — データ・学習・評価・チャット / data, training, evaluation, chat")
        with gr.Tab("データ / Data"):
            data_file = gr.File(label="データファイル / Data file (JSONL, CSV)", type="filepath", elem_id="data-file")
            check_model = gr.Textbox(value=base, label="トークナイザ / Tokenizer model")
            check_button = gr.Button("チェック / Check", elem_id="check")
            check_result = gr.Markdown(elem_id="check-result")
            check_button.click(run_check, [data_file, check_model], check_result)
        with gr.Tab("学習 / Train"):
            recipe_box = gr.Dropdown([str(r) for r in recipes or []], label="レシピ / Recipe", allow_custom_value=True,
                                     value=str(recipes[0]) if recipes else None)
            train_data = gr.File(label="学習データ（任意）/ Training data (optional: replaces data.train)",
                                 type="filepath")
            steps = gr.Number(value=0, label="最大ステップ数（0 = レシピ通り）/ Max steps (0 = as the recipe says)",
                              elem_id="steps")
            with gr.Row():
                train_button = gr.Button("学習開始 / Start training", elem_id="train")
                stop_button = gr.Button("停止 / Stop", elem_id="stop")
                resume_button = gr.Button("再開 / Resume", elem_id="resume")
            started = gr.Markdown(elem_id="started")
            progress = gr.Markdown(elem_id="progress")
            curve = gr.LinePlot(x="step", y="loss", color="kind", label="損失 / Loss")
            train_button.click(run_train, [recipe_box, train_data, steps], started)
            stop_button.click(job.stop, None, started)
            resume_button.click(job.resume, None, started)
            gr.Timer(1.0).tick(job.progress, None, [progress, curve])
        with gr.Tab("評価 / Evaluate"):
            eval_button = gr.Button("評価する / Evaluate the run", elem_id="evaluate")
            eval_result = gr.Markdown()
            eval_button.click(run_eval, None, eval_result)
        with gr.Tab("チャット / Chat"):
            with gr.Row():
                base_chat = gr.Chatbot(label=f"ベース / Base: {base}", elem_id="base-chat")
                tuned_chat = gr.Chatbot(label="チューニング後 / Tuned", elem_id="tuned-chat")
            message = gr.Textbox(label="メッセージ / Message", elem_id="message")
            send = gr.Button("送信 / Send", elem_id="send")
            send.click(run_chat, [message, base_chat, tuned_chat], [base_chat, tuned_chat, message])
    return app


def stream_both(message: str, base_history: list, tuned_history: list, base: Any, tuned: Any,
                system: str | None) -> Iterator[tuple[list, list, str]]:
    """Both chat panes as the answers are written: the base model's answer streams in, then the tuned one's."""
    from shitate.config import GenerateSpec
    from shitate.errors import ShitateError
    from shitate.models.inference import stream_answer

    spec = GenerateSpec(max_new_tokens=64, temperature=0.0)
    turn = {"role": "user", "content": message}
    opening = [{"role": "system", "content": system}] if system else []

    def conversation(history: list) -> list[dict[str, str]]:  # each side continues its own conversation
        return opening + [{"role": m["role"], "content": _text(m["content"])} for m in history] + [turn]

    replies = {"base": "", "tuned": "" if tuned is not None else "(no tuned model yet)"}

    def panes() -> tuple[list, list, str]:
        return (base_history + [turn, {"role": "assistant", "content": replies["base"]}],
                tuned_history + [turn, {"role": "assistant", "content": replies["tuned"]}], "")

    for side, model, history in (("base", base, base_history), ("tuned", tuned, tuned_history)):
        if model is None:
            continue
        try:
            for piece in stream_answer(model, conversation(history), spec):
                replies[side] += piece
                yield panes()
        except ShitateError as error:  # a conversation past a GPT-2's positions: said in its pane, the page goes on
            replies[side] = f"({error})"
        replies[side] = replies[side].strip()
    yield panes()


def _text(content: Any) -> str:
    """A chat message's text: Gradio may hand it back as a list of typed parts."""
    if isinstance(content, list):
        return "".join(part.get("text", "") if isinstance(part, dict) else str(part) for part in content)
    return str(content)


def launch(app: Any, host: str = "127.0.0.1", port: int = 7860, block: bool = True) -> Any:
    """Serve the app on this machine only by default; no share link, no external fonts."""
    import gradio as gr

    theme = gr.themes.Default(font=["sans-serif"], font_mono=["monospace"])
    return app.launch(server_name=host, server_port=port, share=False, theme=theme, prevent_thread_lock=not block,
                      show_error=True, quiet=True)
