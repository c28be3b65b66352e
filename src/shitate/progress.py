"""The one place that prints: a rich console, spinners and the training bar, from rank 0 only."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn, TimeRemainingColumn

console = Console(stderr=True)

LOG_LINE_EVERY_S = 30.0  # how often a bar writes a line where stderr is not a terminal


class _Progress(Progress):
    """rich's bar; and where stderr is not a terminal (a log under nohup, CI, a job scheduler), where rich draws
    nothing until the end, the same columns as a plain line every LOG_LINE_EVERY_S seconds — an eight-minute
    `data synth` otherwise leaves its log empty until it is done."""

    def __init__(self, *columns: Any, **options: Any) -> None:
        super().__init__(*columns, **options)
        self._last_line = time.monotonic()  # a job done within the interval logs only its end

    def update(self, task_id: TaskID, **fields: Any) -> None:
        super().update(task_id, **fields)
        self._log_line(task_id)

    def advance(self, task_id: TaskID, advance: float = 1) -> None:
        super().advance(task_id, advance)
        self._log_line(task_id)

    def _log_line(self, task_id: TaskID) -> None:
        if self.disable or self.console.is_terminal:
            return
        task = self._tasks[task_id]
        if task.finished and not self.live.transient:
            return  # rich prints a lasting bar's end itself; a transient one would leave no trace
        now = time.monotonic()
        if now - self._last_line >= LOG_LINE_EVERY_S or task.finished:
            self._last_line = now
            self.console.print(self.make_tasks_table([task]))


def is_main_process() -> bool:
    """True on rank 0 (or when not distributed), so distributed runs print once."""
    return os.environ.get("RANK", "0") == "0" and os.environ.get("LOCAL_RANK", "0") == "0"


def counted(count: int, noun: str, plural: str | None = None) -> str:
    """"1 error", "3 errors": a count with its noun in the right number."""
    return f"{count} {noun if count == 1 else plural or noun + 's'}"


def say(message: str) -> None:
    """Print a line for people (to stderr, so stdout stays machine-readable)."""
    if is_main_process():
        console.print(message)


@contextlib.contextmanager
def status(message: str, enabled: bool = True) -> Iterator[None]:
    """A spinner for work of unknown length."""
    if enabled and is_main_process():
        with console.status(message):
            yield
    else:
        yield


def training_bar(total_steps: int) -> Progress:
    """Steps, loss, tokens/s and ETA: what people watch during a fine-tune."""
    return _Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.4f}"),
        TextColumn("{task.fields[tokens_per_s]:.0f} tok/s"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=console,
        disable=not is_main_process(),
        transient=False,
    )


def quiet_libraries() -> None:
    """Silence transformers' own progress bars and advice; shitate shows its own progress."""
    import warnings

    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")



def work_bar() -> Progress:
    """Items done of a known number, with elapsed time and ETA: generation, scoring, scrubbing."""
    return _Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TextColumn("ETA"), TimeRemainingColumn(), console=console, disable=not is_main_process(),
                    transient=True)
