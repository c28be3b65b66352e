"""Readers for the formats people have, and the one canonical chat JSONL we train on.

Canonical record: {"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}
with optional "context" (a passage placed before the first question), and on an assistant message
an optional "weight" of 0 or 1 (OpenAI's fine-tuning format: 0 keeps that turn in the context but out of the loss).
"""

from __future__ import annotations

import codecs
import csv
import io
import itertools
import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Literal

from shitate.errors import DataError, Problem, ShitateError

Format = Literal["auto", "chat", "alpaca", "dolly", "sharegpt", "prompt-completion", "csv", "tsv", "xlsx"]
FORMATS: tuple[str, ...] = ("auto", "chat", "alpaca", "dolly", "sharegpt", "prompt-completion", "csv", "tsv", "xlsx")
ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "chatgpt": "assistant", "bard": "assistant", "bing": "assistant", "model": "assistant",
                  "system": "system"}


class RecordError(ValueError):
    """A record that cannot be converted; carries the field at fault and how to fix it."""

    def __init__(self, field: str, message: str, fix: str = "") -> None:
        super().__init__(message)
        self.field, self.message, self.fix = field, message, fix


# A line longer than this is no training example (no model's context holds 8 MB of text): it is a file
# without line breaks, or a document pasted into one field. Reading stops at the limit instead of
# loading the whole line.
MAX_LINE_BYTES = 8 * 2**20


def read_jsonl(path: Path, encoding: str | None = None, arrays: bool = False) -> Iterator[tuple[int, Any | Problem]]:
    """Yield (1-based line, parsed object) or (line, Problem) for lines that are not JSON.

    The file must be UTF-8 unless `encoding` names another. A file that is one JSON array is refused
    (with the fix), or read item by item with `arrays` (importers accept what people have).
    """
    path = Path(path)
    table = path.suffix.lower()
    if table in (".csv", ".tsv", ".parquet", ".xlsx", ".xls") and not arrays and path.is_file():  # where JSONL belongs
        fix = (f"import it first: `shitate data import {path} --out {path.stem}.jsonl`" if table != ".xls"
               else "save it from Excel as .xlsx or CSV, then `shitate data import` it")
        kind = "a Parquet file" if table == ".parquet" else f"a {table[1:].upper()} table"
        raise DataError([Problem(path, None, None, f"is {kind}, not JSON Lines", fix)])
    lines: Iterator[tuple[int, str | Problem]] = _decoded_lines(path, encoding)
    for number, line in lines:
        if isinstance(line, str) and not line.strip():
            continue
        if isinstance(line, str) and line.lstrip().startswith("["):
            # The first record opens a bracket: is the whole file one JSON array, over many lines or all on this one
            # (what json.dump writes without indent)?
            rest = list(lines)
            document = line + "".join(text for _, text in rest if isinstance(text, str))
            if _is_json_array(document):
                if not arrays:
                    raise DataError([Problem(path, None, None, "is one JSON array, not JSON Lines (one object a "
                                             "line)", f"convert it with `shitate data import {path} --out "
                                             f"{path.with_suffix('.jsonl').name}`")])
                yield from _array_items(document, number)
                return
            lines = iter(rest)
        yield from _parsed(path, itertools.chain([(number, line)], lines))
        return


def _parsed(path: Path, lines: Iterable[tuple[int, str | Problem]]) -> Iterator[tuple[int, Any | Problem]]:
    for number, line in lines:
        if isinstance(line, Problem):
            yield number, line
        elif line.strip():
            try:
                yield number, json.loads(line)
            except json.JSONDecodeError as err:
                yield number, Problem(path, number, None, f"not valid JSON ({err.msg} at column {err.colno})",
                                      "each line must be one complete JSON object")


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
        return True
    except json.JSONDecodeError:
        return False


def _is_json_array(document: str) -> bool:
    try:
        return isinstance(json.loads(document), list)
    except json.JSONDecodeError:
        return False


def _array_items(document: str, first_line: int) -> Iterator[tuple[int, Any]]:
    """Each item of a JSON array with the line it starts on, so problems still point at a line."""
    decoder, position = json.JSONDecoder(), document.index("[") + 1
    while True:
        while position < len(document) and document[position] in " \t\r\n,":
            position += 1
        if position >= len(document) or document[position] == "]":
            return
        item, end = decoder.raw_decode(document, position)
        yield first_line + document.count("\n", 0, position), item
        position = end


def _decoded_lines(path: Path, encoding: str | None) -> Iterator[tuple[int, str | Problem]]:
    """Each line as text, or a Problem for a line that is too long or not in the file's encoding.

    A file that is binary, or wholly in a Japanese legacy encoding (Shift_JIS from Excel and Windows
    tools), is refused as a whole with the fix, rather than as thousands of undecodable lines.
    """
    from shitate.data.text import looks_binary

    _check_encoding(encoding)
    if not path.is_file():
        raise ShitateError(f"{path}: file not found. Check the path (it is read relative to the current folder).")
    binary = DataError([Problem(path, None, None, "is a binary file, not text",
                                "give a JSONL file (one JSON object a line, UTF-8)")])
    whole_file_checked = False
    with path.open("rb") as handle:
        if b"\x00" in handle.read(8192):
            raise binary
        handle.seek(0)
        for number in itertools.count(1):
            raw = handle.readline(MAX_LINE_BYTES + 1)
            if not raw:
                return
            if len(raw) > MAX_LINE_BYTES and not raw.endswith(b"\n"):
                skipped = len(raw) + _skip_line(handle)
                yield number, Problem(path, number, None, f"is {skipped / 2**20:.0f} MB on one line, more than any "
                                      "training example", "split the text into records of one conversation (or one "
                                      "document of at most a few thousand words) each")
                continue
            try:
                yield number, raw.decode(encoding or ("utf-8-sig" if number == 1 else "utf-8"))
            except UnicodeDecodeError as err:
                if not whole_file_checked:  # once, at the first bad line: the file as a whole may explain it
                    whole_file_checked = True
                    content = path.read_bytes()
                    if looks_binary(content.decode("latin-1")):
                        raise binary from None
                    legacy = _legacy_encoding(path, content) if encoding is None else None
                    if legacy:
                        raise DataError([Problem(path, None, None, f"is not UTF-8: it reads as {legacy}",
                                                 f"convert it (`iconv -f {legacy} -t UTF-8 {path.name} > utf8.jsonl`) or "
                                                 f"import it: `shitate data import {path.name} --encoding {legacy} "
                                                 "--out utf8.jsonl`")]) from None
                yield number, Problem(path, number, None, f"not valid {encoding or 'UTF-8'} (byte "
                                      f"0x{raw[err.start]:02x} at byte {err.start + 1} of the line)",
                                      "re-save the file as UTF-8 or fix the line; a stray byte often comes from "
                                      "pasting between programs")


def _skip_line(handle) -> int:  # noqa: ANN001 - a binary file
    """Read past the rest of an over-long line without keeping it; the bytes skipped."""
    skipped = 0
    while chunk := handle.readline(MAX_LINE_BYTES):
        skipped += len(chunk)
        if chunk.endswith(b"\n"):
            break
    return skipped


def _legacy_encoding(path: Path, content: bytes) -> str | None:
    """cp932 or euc_jp when the file is wholly in one (no line with non-ASCII bytes reads as UTF-8), else None:
    a UTF-8 file with a stray byte is not re-read as Shift_JIS."""
    from shitate.data.text import decode, japanese_score

    for line in content.splitlines():
        if not line.isascii():
            try:
                line.decode("utf-8")
                return None
            except UnicodeDecodeError:
                continue
    try:
        text, encoding = decode(path)
    except DataError:
        return None
    return None if encoding.startswith("utf") or japanese_score(text) <= 0 else encoding


def _check_encoding(encoding: str | None) -> None:
    if encoding is not None:
        try:
            codecs.lookup(encoding)
        except LookupError:
            raise ShitateError(f"--encoding {encoding!r}: not an encoding Python knows; Japanese files are "
                               "usually utf-8, cp932 (Shift_JIS, Excel on Windows) or euc_jp") from None


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


def turn_weight(message: dict[str, Any], where: str) -> int | None:
    """The `weight` of a message as OpenAI's fine-tuning format has it, or None where it has none: on an assistant
    message, 0 (in the context, not trained) or 1 (trained, as without a weight)."""
    if "weight" not in message:
        return None
    weight = message["weight"]
    if message.get("role") != "assistant":
        raise RecordError(f"{where}.weight", f"is set on a {message.get('role')} message",
                          "only assistant messages carry a weight (0: not trained, 1: trained); remove it")
    if isinstance(weight, str) or weight not in (0, 1):
        raise RecordError(f"{where}.weight", f"is {weight!r}", "use 0 (the turn stays in the context but is not "
                          "trained) or 1 (trained, as without a weight)")
    return int(weight)


def record_weight(record: dict[str, Any]) -> int | None:
    """A `weight` on the record (the design's chat format has one): the weight of its assistant messages that
    carry none of their own."""
    if "weight" not in record:
        return None
    try:
        return turn_weight({"role": "assistant", "weight": record["weight"]}, "record")
    except RecordError as err:
        raise RecordError("weight", err.message, err.fix) from None


def trained_turn_problem(record: dict[str, Any]) -> RecordError | None:
    """A record whose weights leave nothing to learn."""
    default = record_weight(record)
    weights = [m.get("weight", 1 if default is None else default) for m in record["messages"]
               if isinstance(m, dict) and m.get("role") == "assistant"]
    if weights and not any(weights):
        return RecordError("messages", "has no trained turn: every assistant weight is 0",
                           "set weight 1 on the answer to learn, or drop the record")
    return None


TOOL_CALL_FIX = ("shitate trains text turns only: drop the tool calls and their results from the conversation, or "
                 "write them out as text")


def is_tool_call(message: dict[str, Any]) -> bool:
    """Whether a message belongs to OpenAI-style function calling (an assistant's tool_calls, a tool's result)."""
    return message.get("role") in ("tool", "function") or bool(message.get("tool_calls") or message.get("function_call"))


def _joined_text_parts(content: Any) -> Any:
    """Content given as OpenAI's parts ([{"type": "text", "text": …}, …]) as one string, as the server reads it."""
    if not isinstance(content, list):
        return content
    if not all(isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)
               for part in content):
        raise RecordError("content", "has a part that is not text (an image, audio, …)",
                          "shitate trains on text only: drop the other parts")
    return "\n".join(part["text"] for part in content)


def _chat(record: dict[str, Any]) -> dict[str, Any]:
    messages = record.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RecordError("messages", "missing or not a non-empty list")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise RecordError(f"messages[{i}]", "is not an object with role and content")
        if is_tool_call(message):
            raise RecordError(f"messages[{i}]", "is part of a tool call (function calling)", TOOL_CALL_FIX)
        role = message.get("role")
        if role not in ROLES:
            raise RecordError(f"messages[{i}].role", f"is {role!r}", "expected one of system, user, assistant")
        try:
            content = _text({"content": _joined_text_parts(message.get("content"))}, "content")
        except RecordError as err:
            raise RecordError(f"messages[{i}].{err.field}", err.message, err.fix) from None
        turn: dict[str, Any] = {"role": role, "content": content}
        weight = turn_weight(message, f"messages[{i}]")
        if weight is None and role == "assistant":
            weight = record_weight(record)
        if weight is not None:
            turn["weight"] = weight
        out.append(turn)
    problem = trained_turn_problem({"messages": out})
    if problem:
        raise problem
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


def import_records(path: Path, fmt: str = "auto", system: str | None = None, question_column: str | None = None,
                   answer_column: str | None = None, skip_bad: bool = False,
                   encoding: str | None = None) -> tuple[list[dict[str, Any]], list[Problem]]:
    """Convert a file to canonical chat records; raise DataError unless skip_bad."""
    path = Path(path)
    if fmt == "auto":
        suffix = path.suffix.lower()
        fmt = ("csv" if suffix == ".csv" else "tsv" if suffix in (".tsv", ".tab")
               else "xlsx" if suffix in (".xlsx", ".xlsm") else "auto")
    if fmt in ("csv", "tsv", "xlsx"):
        rows = _read_table(path, "\t" if fmt == "tsv" else ",", question_column, answer_column, encoding)
    else:
        rows = _convert_jsonl(path, fmt, encoding)
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


def read_records(path: Path, encoding: str | None = None) -> Iterator[tuple[int, Any | Problem]]:
    """What an importer reads: JSON Lines or one JSON array (read_jsonl), or the rows of a Parquet file — how the
    Hugging Face hub stores data sets — numbered from 1 as lines are."""
    if Path(path).suffix.lower() == ".parquet":
        yield from _parquet_rows(Path(path))
    else:
        yield from read_jsonl(path, encoding, arrays=True)


def _parquet_rows(path: Path) -> Iterator[tuple[int, Any]]:
    try:
        import pyarrow.parquet as parquet
    except ImportError:
        raise ShitateError(f"{path}: reading Parquet needs pyarrow: `pip install pyarrow` (or `pip install -e "
                           "'.[parquet]'`), or save the data set as JSON Lines") from None
    if not path.is_file():
        raise DataError([Problem(path, None, None, "file not found", "check the path")])
    try:
        batches = parquet.ParquetFile(path).iter_batches(batch_size=1024)
        number = 0
        for batch in batches:
            for row in batch.to_pylist():
                number += 1
                yield number, row
    except (OSError, ValueError) as err:  # pyarrow's ArrowInvalid is a ValueError
        raise DataError([Problem(path, None, None, f"is not a Parquet file pyarrow can read ({err})",
                                 "check that the download finished, or give the data set as JSON Lines")]) from None


def _convert_jsonl(path: Path, fmt: str, encoding: str | None) -> Iterator[tuple[int, dict[str, Any] | Problem]]:
    for line, obj in read_records(path, encoding):
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


# Header names a table may use when the user names no columns: the English ones, then what a Japanese team's
# spreadsheet usually says. The first present wins.
QUESTION_HEADERS = ("question", "質問", "質問文", "問い", "問題", "入力", "prompt", "instruction")
ANSWER_HEADERS = ("answer", "回答", "答え", "解答", "応答", "出力", "response", "output")


def _read_table(path: Path, delimiter: str, question_column: str | None, answer_column: str | None,
                encoding: str | None = None) -> Iterator[tuple[int, dict[str, Any] | Problem]]:
    from shitate.data.text import decode

    if not path.is_file():
        raise ShitateError(f"{path}: file not found. Check the path (it is read relative to the current folder).")
    if path.suffix.lower() in (".xlsx", ".xlsm"):
        columns, rows = _sheet_rows(path)
    else:
        _check_encoding(encoding)
        # Excel on a Japanese Windows saves CSV in cp932: detect it (or take the user's --encoding) rather than fail.
        reader = csv.DictReader(io.StringIO(decode(path, encoding)[0], newline=""), delimiter=delimiter)
        columns = list(reader.fieldnames or [])
        rows = ((reader.line_num, row) for row in reader)  # line_num is read after each row: where it ends
    if not columns:
        raise DataError([Problem(path, None, None, "is empty (no header row)",
                                 f"the first row must name the columns, e.g. {question_column or 'question'},"
                                 f"{answer_column or 'answer'}")])
    question_column = question_column or next((c for c in QUESTION_HEADERS if c in columns), "question")
    answer_column = answer_column or next((c for c in ANSWER_HEADERS if c in columns), "answer")
    missing = [c for c in (question_column, answer_column) if c not in columns]
    if missing:
        raise DataError([Problem(path, 1, ", ".join(missing), f"column not found; the header has: {', '.join(columns)}",
                                 _header_fix(list(columns), delimiter))])
    for line, row in rows:
        try:
            yield line, _pair(_text(row, question_column), _text(row, answer_column))
        except RecordError as err:
            yield line, Problem(path, line, err.field, err.message, err.fix)


def _sheet_rows(path: Path) -> tuple[list[str], Iterator[tuple[int, dict[str, str]]]]:
    """The first sheet of an Excel workbook as a header and rows numbered as Excel numbers them; numbers and dates
    as text, rows with no value skipped (Excel keeps formatted empty rows)."""
    try:
        import openpyxl
    except ImportError:
        raise ShitateError(f"{path}: reading Excel workbooks needs openpyxl: `pip install openpyxl` (or `pip install "
                           "-e '.[excel]'`), or save the sheet as CSV") from None
    try:
        book = openpyxl.load_workbook(path, read_only=True, data_only=True)
    except Exception as err:  # noqa: BLE001 - openpyxl raises zipfile's, KeyError, its own InvalidFileException
        raise DataError([Problem(path, None, None, f"is not an Excel workbook openpyxl can read ({err})",
                                 "save it again from Excel as .xlsx, or as CSV")]) from None
    rows = book.worksheets[0].iter_rows(values_only=True)
    columns = ["" if cell is None else str(cell).strip() for cell in next(rows, None) or ()]
    while columns and not columns[-1]:
        columns.pop()

    def numbered() -> Iterator[tuple[int, dict[str, str]]]:
        try:
            for number, values in enumerate(rows, start=2):
                if any(value is not None and str(value).strip() for value in values):
                    yield number, {column: "" if value is None else str(value) for column, value in zip(columns, values)}
        finally:
            book.close()  # a read-only workbook keeps its file open until closed

    return columns, numbered()


def _header_fix(columns: list[str], delimiter: str) -> str:
    other = next((d for d in (";", "\t", ",", "|") if d != delimiter and len(columns) == 1 and d in columns[0]), None)
    if other:
        return (f"the header reads as one column: the file seems separated by {other!r}, not {delimiter!r}; save it "
                "as comma-separated CSV" + (" or pass --format tsv" if other == "\t" else ""))
    return "name the columns with --question-column/--answer-column"


def read_chat(path: Path) -> list[tuple[int, dict[str, Any]]]:
    """(line, record) of a canonical chat JSONL, read strictly; any problem raises DataError listing all of them."""
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
            records.append((line, _chat(obj if isinstance(obj, dict) else {})))
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
