"""Errors meant for people: each says what is wrong, where, and what to do.

The CLI prints a ShitateError as one paragraph and exits 1; anything else is a bug
and keeps its traceback.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


class ShitateError(Exception):
    """A user mistake or an environment problem with a known fix."""


def require(module: str, extra: str, purpose: str, package: str | None = None):  # noqa: ANN201 - the module
    """Import an optional dependency, or say which extra brings it: a missing package is an installation
    problem with a known fix, not a bug."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise ShitateError(f"{purpose} needs the {package or module.split('.')[0]} package: "
                           f"pip install 'shitate[{extra}]'") from None


class ConfigError(ShitateError):
    """A recipe or command-line setting is invalid."""


class ModelError(ShitateError):
    """A model could not be found or loaded."""


@dataclass(frozen=True)
class Problem:
    """One problem in a data file, located to the line and field."""

    file: Path | str
    line: int | None
    field: str | None
    message: str
    fix: str = ""

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line is not None else f"{self.file}"
        what = f"{self.field}: {self.message}" if self.field else self.message
        return f"{where}: {what}" + (f" — {self.fix}" if self.fix else "")


class DataError(ShitateError):
    """A data file has one or more problems; all of them are listed."""

    def __init__(self, problems: list[Problem], limit: int = 50) -> None:
        self.problems = problems
        shown = [str(p) for p in problems[:limit]]
        more = len(problems) - len(shown)
        if more > 0:
            shown.append(f"… and {more} more problems")
        super().__init__("\n".join(shown))


class TrainingInterrupted(Exception):
    """Training stopped on request (Ctrl-C) after saving a checkpoint; the CLI exits 130, as a shell does for SIGINT.

    Not a ShitateError: nothing went wrong, and the message says how to continue.
    """


class StoppedAtExit(Exception):
    """Model work in a thread was stopped because Python is exiting; what it had done is not returned."""


class TrainingDiverged(ShitateError):
    """Training stopped because it diverged (a loss that is not a number, a KL past the recipe's limit); the
    weights of the last checkpoint are kept and the message says why and what to change."""
