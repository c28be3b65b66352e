"""`shitate data check`: every problem of a chat JSONL with its line, field and fix, plus statistics."""

from __future__ import annotations

import difflib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shitate.data.formats import (
    ROLES,
    TOOL_CALL_FIX,
    RecordError,
    detect_format,
    is_tool_call,
    read_jsonl,
    trained_turn_problem,
    turn_weight,
)
from shitate.data.templates import ChatTemplate, RewrittenAnswer, SpecialMarkers, encode_chat
from shitate.errors import Problem


@dataclass
class FileReport:
    """What `data check` found: problems (errors and warnings) and statistics."""

    path: Path
    errors: list[Problem] = field(default_factory=list)
    warnings: list[Problem] = field(default_factory=list)
    records: int = 0
    turns: Counter = field(default_factory=Counter)
    tokens: Counter = field(default_factory=Counter)
    lengths: list[int] = field(default_factory=list)
    duplicates: int = 0


def _content_problems(message: dict[str, Any], file_name: str, markers: SpecialMarkers) -> list[tuple[str, str]]:
    """What is wrong with a message's content, each with its fix."""
    content = message.get("content")
    if "content" not in message:
        return [("missing", "add the text of the turn")]
    if isinstance(content, list):
        return [("is a list of content parts, expected a string",
                 f"`shitate data import {file_name} --out chats.jsonl` joins text parts")]
    if not isinstance(content, str):
        return [(f"is {type(content).__name__}, expected a string", "")]
    if not content.strip():
        return [("is empty", "write the turn's text or drop the record")]
    return [(f"contains the special token string {marker!r}", "remove it: templates add turn markers themselves")
            for marker in markers.found_in(content)]


def _message_problems(path: Path, line: int, messages: Any, markers: SpecialMarkers) -> list[Problem]:
    if not isinstance(messages, list) or not messages:
        return [Problem(path, line, "messages", "missing or not a non-empty list",
                        'use {"messages": [{"role": "user", "content": …}, …]}')]
    problems = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            problems.append(Problem(path, line, where, "is not an object", 'write {"role": …, "content": …}'))
            continue
        if is_tool_call(message):
            problems.append(Problem(path, line, where, "is part of a tool call (function calling)", TOOL_CALL_FIX))
            continue
        role = message.get("role")
        if role not in ROLES:
            close = difflib.get_close_matches(str(role), ROLES, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            problems.append(Problem(path, line, f"{where}.role", f"is {role!r}; expected one of system, user, assistant{hint}"))
        elif role == "system" and i != 0:
            problems.append(Problem(path, line, f"{where}.role", "a system message may only come first", "move it to the start"))
        problems += [Problem(path, line, f"{where}.content", what, fix)
                     for what, fix in _content_problems(message, path.name, markers)]
        try:
            turn_weight(message, where)
        except RecordError as err:
            problems.append(Problem(path, line, err.field, err.message, err.fix))
    roles = [m.get("role") for m in messages if isinstance(m, dict) and m.get("role") in ROLES and not is_tool_call(m)]
    turns = [r for r in roles if r != "system"]
    if turns and turns[0] != "user":
        problems.append(Problem(path, line, "messages", f"the first turn after the system prompt is {turns[0]!r}",
                                "start the conversation with a user turn"))
    if any(a == b for a, b in zip(turns, turns[1:])):
        problems.append(Problem(path, line, "messages", "two turns in a row have the same role",
                                "alternate user and assistant, or merge the turns"))
    if turns and turns[-1] != "assistant":
        problems.append(Problem(path, line, "messages", "does not end with an assistant turn",
                                "add the answer the model should learn, or drop the record"))
    return problems


def check_file(path: Path, tokenizer: Any = None, template: ChatTemplate | None = None, max_length: int | None = None,
               system: str | None = None) -> FileReport:
    """Validate a canonical chat JSONL; with a tokenizer, also count tokens and find over-long examples."""
    path = Path(path)
    report = FileReport(path)
    markers = SpecialMarkers(tokenizer)
    seen: set[str] = set()
    for line, obj in read_jsonl(path):
        if isinstance(obj, Problem):
            report.errors.append(obj)
            continue
        if not isinstance(obj, dict):
            report.errors.append(Problem(path, line, None, f"is a JSON {type(obj).__name__}, expected an object"))
            continue
        if "messages" not in obj:
            other = detect_format(obj)
            fix = f"this looks like {other} data: convert it with `shitate data import`" if other else 'add "messages"'
            report.errors.append(Problem(path, line, "messages", "missing", fix))
            continue
        problems = _message_problems(path, line, obj["messages"], markers)
        if not problems:
            try:
                unweighted = trained_turn_problem(obj)
            except RecordError as err:  # a record-level weight of another value
                unweighted = err
            if unweighted:
                problems.append(Problem(path, line, unweighted.field, unweighted.message, unweighted.fix))
        if problems:
            report.errors.extend(problems)
            continue
        if tokenizer is not None and template is not None and not _count_tokens(report, line, obj, tokenizer, template,
                                                                                max_length, system):
            continue  # the template rewrites an answer: an error, not a record
        report.records += 1
        messages = obj["messages"]
        key = "\x1e".join(m["content"].strip() for m in messages)
        if key in seen:
            report.duplicates += 1
            report.warnings.append(Problem(path, line, None, "repeats an earlier conversation",
                                           "`shitate data split` keeps repeats together; consider removing them"))
        seen.add(key)
        report.turns.update(m["role"] for m in messages)
    if report.records == 0 and not report.errors:
        report.errors.append(Problem(path, None, None, "the file has no records"))
    return report


def _count_tokens(report: FileReport, line: int, record: dict[str, Any], tokenizer: Any, template: ChatTemplate,
                  max_length: int | None, system: str | None) -> bool:
    """Count the record's tokens into the report; False (and an error) where the template rewrites an answer."""
    from shitate.data.formats import conversation

    messages = conversation(record, system)
    try:
        total = len(encode_chat(messages, tokenizer, template, max_length=10**9)["input_ids"])
    except RewrittenAnswer as err:
        report.errors.append(Problem(report.path, line, "messages", err.what, err.fix))
        return False
    for message in messages:
        report.tokens[message["role"]] += len(tokenizer(message["content"], add_special_tokens=False)["input_ids"])
    report.lengths.append(total)
    if max_length is not None and total > max_length:
        report.warnings.append(Problem(report.path, line, None, f"is {total} tokens, longer than max_length {max_length}",
                                       "it will be cut on the right; raise train.max_length or shorten it"))
    return True


def histogram(lengths: list[int], bins: int = 8) -> list[tuple[int, int, int]]:
    """(low, high, count) buckets over token lengths, for a text histogram."""
    if not lengths:
        return []
    low, high = min(lengths), max(lengths)
    width = max(1, -(-(high - low + 1) // bins))
    counts = Counter((n - low) // width for n in lengths)
    return [(low + b * width, low + (b + 1) * width - 1, counts.get(b, 0)) for b in range(-(-(high - low + 1) // width))]


def check_text_file(path: Path, tokenizer: Any = None, max_length: int | None = None) -> FileReport:
    """Validate raw text for stage pretrain: a {"text": …} JSONL, a .txt/.md file or a folder of them.

    Errors: lines that are not JSON, records without text, empty or binary records or files.
    Warnings: repeated documents, and (with a tokenizer) documents longer than max_length tokens,
    which training cuts into pieces that do not attend to each other.
    """
    from shitate.data.text import decode, is_text_source, text_files, text_jsonl_records
    from shitate.errors import DataError

    path = Path(path)
    report = FileReport(path)
    documents: list[tuple[Path, int | None, str]] = []
    files = (text_files(path) if path.is_dir() else [path]) if is_text_source(path) else []
    for file in files:
        try:
            text = decode(file)[0]
        except DataError as err:
            report.errors.extend(err.problems)
            continue
        if not text.strip():
            report.errors.append(Problem(file, None, None, "is empty", "remove it or give it some text"))
            continue
        documents.append((file, None, text))
    if not is_text_source(path):
        try:
            for item in text_jsonl_records(path):
                if isinstance(item, Problem):
                    report.errors.append(item)
                else:
                    documents.append((path, item.line, item.text))
        except DataError as err:  # the file as a whole: binary, or in no known encoding
            report.errors.extend(err.problems)
    seen: set[str] = set()
    for file, line, text in documents:
        report.records += 1
        key = text.strip()
        if key in seen:
            report.duplicates += 1
            report.warnings.append(Problem(file, line, None, "repeats an earlier document", "remove the copy"))
        seen.add(key)
        if tokenizer is not None:
            count = len(tokenizer(text, add_special_tokens=False)["input_ids"]) + 2  # with <bos> and <eos>
            report.lengths.append(count)
            if max_length is not None and count > max_length:
                report.warnings.append(Problem(
                    file, line, None, f"is {count} tokens, longer than the block size {max_length}",
                    f"training cuts it into {-(-count // max_length)} pieces that do not see each other; raise "
                    "pretrain.block_size or split it at headings"))
    if report.records == 0 and not report.errors:
        report.errors.append(Problem(path, None, None, "has no text"))
    return report


def is_text_data(path: Path) -> bool:
    """Whether a data file holds raw text (a .txt/.md file, a folder, or JSONL whose first record has "text")."""
    import json

    from shitate.data.text import is_text_source

    path = Path(path)
    if is_text_source(path):
        return True
    if not path.is_file():
        return False
    with path.open(encoding="utf-8", errors="replace") as handle:
        for line in handle:
            if line.strip():
                try:
                    first = json.loads(line)
                except json.JSONDecodeError:
                    return False
                return isinstance(first, dict) and "text" in first and "messages" not in first
    return False
