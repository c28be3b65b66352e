"""Readers for the formats people have, and the one canonical chat JSONL we train on.

Canonical record: {"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}
with optional "context" (a passage placed before the first question).
"""

from __future__ import annotations

import csv
import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Literal

from shitate.errors import DataError, Problem, ShitateError

Format = Literal["auto", "chat", "alpaca", "dolly", "sharegpt", "prompt-completion", "csv", "tsv"]
FORMATS: tuple[str, ...] = ("auto", "chat", "alpaca", "dolly", "sharegpt", "prompt-completion", "csv", "tsv")
ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "chatgpt": "assistant", "bard": "assistant", "bing": "assistant", "model": "assistant",
                  "system": "system"}


class RecordError(ValueError):
    """A record that cannot be converted; carries the field at fault and how to fix it."""

    def __init__(self, field: str, message: str, fix: str = "") -> None:
        super().__init__(message)
        self.field, self.message, self.fix = field, message, fix


def read_jsonl(path: Path) -> Iterator[tuple[int, Any | Problem]]:
    """Yield (1-based line, parsed object) or (line, Problem) for lines that are not JSON."""
    with _open_text(path) as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                yield number, json.loads(line)
            except json.JSONDecodeError as err:
                yield number, Problem(path, number, None, f"not valid JSON ({err.msg} at column {err.colno})",
                                      "each line must be one complete JSON object")


def _open_text(path: Path):  # noqa: ANN202 - a text handle
    if not path.is_file():
        raise ShitateError(f"{path}: file not found. Check the path (it is read relative to the current folder).")
    # utf-8-sig: spreadsheets often save CSV with a byte-order mark that would otherwise end up in the first column name.
    return path.open(encoding="utf-8-sig", newline="")


def _text(record: dict[str, Any], key: str, required: bool = True) -> str:
    value = record.get(key)
    if value is None:
        if required:
            raise RecordError(key, "missing", f"add a non-empty \"{key}\" field")
        return ""
    if not isinstance(value, str):
        raise RecordError(key, f"is {type(value).__name__}, expected a string")
    if required and not value.strip():
        raise RecordError(key, "is empty", "give it some text or drop the record")
    return value.strip()


def _chat(record: dict[str, Any]) -> dict[str, Any]:
    messages = record.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RecordError("messages", "missing or not a non-empty list")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise RecordError(f"messages[{i}]", "is not an object with role and content")
        role = message.get("role")
        if role not in ROLES:
            raise RecordError(f"messages[{i}].role", f"is {role!r}", "expected one of system, user, assistant")
        out.append({"role": role, "content": _text(message, "content")})
    converted: dict[str, Any] = {"messages": out}
    if record.get("context"):
        converted["context"] = _text(record, "context")
    return converted


def _pair(question: str, answer: str, context: str = "") -> dict[str, Any]:
    record: dict[str, Any] = {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}
    if context:
        record["context"] = context
    return record


def _alpaca(record: dict[str, Any]) -> dict[str, Any]:
    instruction, extra = _text(record, "instruction"), _text(record, "input", required=False)
    return _pair(f"{instruction}\n\n{extra}" if extra else instruction, _text(record, "output"))


def _dolly(record: dict[str, Any]) -> dict[str, Any]:
    # databricks-dolly uses context/response; the Japanese translation uses input/output.
    context = _text(record, "context", required=False) or _text(record, "input", required=False)
    answer_key = "response" if "response" in record else "output"
    return _pair(_text(record, "instruction"), _text(record, answer_key), context)


def _sharegpt(record: dict[str, Any]) -> dict[str, Any]:
    turns = record.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise RecordError("conversations", "missing or not a non-empty list")
    messages = []
    for i, turn in enumerate(turns):
        speaker = turn.get("from") if isinstance(turn, dict) else None
        if speaker not in SHAREGPT_ROLES:
            raise RecordError(f"conversations[{i}].from", f"is {speaker!r}", "expected human, gpt or system")
        messages.append({"role": SHAREGPT_ROLES[speaker], "content": _text(turn, "value")})
    return {"messages": messages}


def _prompt_completion(record: dict[str, Any]) -> dict[str, Any]:
    return _pair(_text(record, "prompt"), _text(record, "completion"))


CONVERTERS = {"chat": _chat, "alpaca": _alpaca, "dolly": _dolly, "sharegpt": _sharegpt,
              "prompt-completion": _prompt_completion}


def detect_format(record: Any) -> str | None:
    """Guess a JSON record's format from its keys."""
    if not isinstance(record, dict):
        return None
    if "messages" in record:
        return "chat"
    if "conversations" in record:
        return "sharegpt"
    if "prompt" in record and "completion" in record:
        return "prompt-completion"
    if "instruction" in record and ("context" in record or "response" in record):
        return "dolly"
    if "instruction" in record and "output" in record:
        return "alpaca"
    return None


def _with_system(record: dict[str, Any], system: str | None) -> dict[str, Any]:
    if system and record["messages"][0]["role"] != "system":
        record["messages"].insert(0, {"role": "system", "content": system})
    return record


def import_records(path: Path, fmt: str = "auto", system: str | None = None, question_column: str = "question",
                   answer_column: str = "answer", skip_bad: bool = False) -> tuple[list[dict[str, Any]], list[Problem]]:
    """Convert a file to canonical chat records; raise DataError unless skip_bad."""
    path = Path(path)
    if fmt == "auto":
        suffix = path.suffix.lower()
        fmt = "csv" if suffix == ".csv" else "tsv" if suffix in (".tsv", ".tab") else "auto"
    if fmt in ("csv", "tsv"):
        rows = _read_table(path, "\t" if fmt == "tsv" else ",", question_column, answer_column)
    else:
        rows = _convert_jsonl(path, fmt)
    records, problems = [], []
    for _line, item in rows:
        if isinstance(item, Problem):
            problems.append(item)
        else:
            records.append(_with_system(item, system))
    if problems and not skip_bad:
        raise DataError(problems)
    if not records:
        raise DataError([Problem(path, None, None, "no records found", "is the file empty, or the wrong format?")])
    return records, problems


def _convert_jsonl(path: Path, fmt: str) -> Iterator[tuple[int, dict[str, Any] | Problem]]:
    for line, obj in read_jsonl(path):
        if isinstance(obj, Problem):
            yield line, obj
            continue
        record_format = detect_format(obj) if fmt == "auto" else fmt
        if record_format is None:
            keys = ", ".join(obj) if isinstance(obj, dict) else type(obj).__name__
            yield line, Problem(path, line, None, f"unrecognised record (keys: {keys})",
                                "pass --format chat|alpaca|dolly|sharegpt|prompt-completion")
            continue
        try:
            yield line, CONVERTERS[record_format](obj if isinstance(obj, dict) else {})
        except RecordError as err:
            yield line, Problem(path, line, err.field, err.message, err.fix)


def _read_table(path: Path, delimiter: str, question_column: str, answer_column: str) -> Iterator[tuple[int, dict[str, Any] | Problem]]:
    with _open_text(path) as handle:
        reader = csv.DictReader(handle, delimiter=delimiter)
        columns = reader.fieldnames or []
        missing = [c for c in (question_column, answer_column) if c not in columns]
        if missing:
            raise DataError([Problem(path, 1, ", ".join(missing), f"column not found; the header has: {', '.join(columns)}",
                                     "name the columns with --question-column/--answer-column")])
        for row in reader:
            line = reader.line_num
            try:
                yield line, _pair(_text(row, question_column), _text(row, answer_column))
            except RecordError as err:
                yield line, Problem(path, line, err.field, err.message, err.fix)


def read_chat(path: Path) -> list[dict[str, Any]]:
    """Read a canonical chat JSONL strictly; any problem raises DataError listing all of them."""
    records, problems = [], []
    for line, obj in read_jsonl(Path(path)):
        if isinstance(obj, Problem):
            problems.append(obj)
            continue
        if isinstance(obj, dict) and "text" in obj and "messages" not in obj:
            problems.append(Problem(path, line, "messages", "missing: this is a raw-text record, and stage sft trains "
                                    "on chats", "for continued pretraining on text set `stage: pretrain` in the recipe"))
            continue
        try:
            records.append(_chat(obj if isinstance(obj, dict) else {}))
        except RecordError as err:
            problems.append(Problem(path, line, err.field, err.message, err.fix or "run `shitate data check` for details"))
    if problems:
        raise DataError(problems)
    if not records:
        raise DataError([Problem(path, None, None, "the file has no records")])
    return records


def conversation(record: dict[str, Any], system: str | None = None) -> list[dict[str, str]]:
    """The messages to render: the context (if any) before the first question, a default system prompt."""
    messages = [dict(m) for m in record["messages"]]
    context = record.get("context")
    if context:
        first_user = next(i for i, m in enumerate(messages) if m["role"] == "user")
        messages[first_user]["content"] = f"{context}\n\n{messages[first_user]['content']}"
    return _with_system({"messages": messages}, system)["messages"]


def read_questions(path: Path, system: str | None) -> list[dict[str, Any]]:
    """Questions from chat JSONL (a final assistant turn becomes the reference) or {"prompt": …} lines."""
    items, problems = [], []
    for line, obj in read_jsonl(Path(path)):
        if isinstance(obj, Problem):
            problems.append(obj)
        elif isinstance(obj, dict) and isinstance(obj.get("prompt"), str) and obj["prompt"].strip():
            items.append({"messages": conversation({"messages": [{"role": "user", "content": obj["prompt"]}]}, system),
                          "reference": obj.get("reference") or obj.get("completion")})
        elif isinstance(obj, dict) and isinstance(obj.get("messages"), list) and obj["messages"]:
            messages = conversation(obj, system)
            reference = messages.pop()["content"] if messages[-1].get("role") == "assistant" else None
            items.append({"messages": messages, "reference": reference})
        else:
            problems.append(Problem(path, line, None, "expected chat messages or a prompt",
                                    'write {"messages": […]} or {"prompt": "…"} on each line'))
    if problems:
        raise DataError(problems)
    if not items:
        raise DataError([Problem(path, None, None, "no prompts in the file")])
    return items


def write_jsonl(path: Path, records: Iterable[dict[str, Any]]) -> int:
    """Write records atomically (temp file, then rename), so a crash never leaves half a file."""
    return write_lines(path, (json.dumps(record, ensure_ascii=False) for record in records))


def write_lines(path: Path, lines: Iterable[str]) -> int:
    """Write lines atomically: to a temp file beside `path`, renamed over it only when complete."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{path.name}.*.tmp"):  # left by a write that was killed (SIGKILL skips cleanup)
        stale.unlink(missing_ok=True)
    count = 0
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            for line in lines:
                handle.write(line + "\n")
                count += 1
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return count
