"""Progress where stderr is a log file: rich draws nothing there until the end, so bars write plain lines."""

from __future__ import annotations

import io

from rich.console import Console

from shitate import progress


def logged(monkeypatch, make_bar, every: float, **fields) -> str:
    log = io.StringIO()
    monkeypatch.setattr(progress, "console", Console(file=log, force_terminal=False, width=100))
    monkeypatch.setattr(progress, "LOG_LINE_EVERY_S", every)
    with make_bar() as bar:
        task = bar.add_task("writing questions", total=3, **fields)
        for _ in range(3):
            bar.advance(task)
    return "\n".join(line for line in log.getvalue().splitlines() if line.strip())  # rich ends with a blank line


def test_a_bar_writes_lines_to_a_log_and_its_end(monkeypatch):
    lines = logged(monkeypatch, progress.work_bar, every=0).splitlines()
    assert [line.split("━")[0].strip() for line in lines] == ["writing questions"] * 3
    assert ["1/3" in lines[0], "2/3" in lines[1], "3/3" in lines[2]] == [True, True, True]


def test_a_quick_job_logs_only_its_end_though_its_bar_is_transient(monkeypatch):
    lines = logged(monkeypatch, progress.work_bar, every=3600).splitlines()
    assert len(lines) == 1 and "3/3" in lines[0]


def test_a_lasting_bar_logs_its_end_once(monkeypatch):
    lines = logged(monkeypatch, lambda: progress.training_bar(3), every=0, loss=1.0,
                   tokens_per_s=10.0).splitlines()
    assert [line.count("3/3") for line in lines] == [0, 0, 1]


def test_nothing_extra_is_written_on_a_terminal(monkeypatch):
    log = io.StringIO()
    monkeypatch.setattr(progress, "console", Console(file=log, force_terminal=True, width=100))
    monkeypatch.setattr(progress, "LOG_LINE_EVERY_S", 0)
    bar = progress.work_bar()
    task = bar.add_task("x", total=2)
    bar.advance(task)  # not started: a terminal bar draws only through rich's live display
    assert log.getvalue() == ""
