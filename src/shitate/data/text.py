"""Raw text for continued pretraining: {"text": …} JSONL, or .txt/.md files and folders of them.

Japanese text files are often saved in Shift_JIS (cp932) or EUC-JP rather than UTF-8; a file
is read as UTF-8 if it decodes as UTF-8, else as the first Japanese encoding that decodes it
without error, and a file that is not text at all (NUL bytes, many control characters) is
refused with its name rather than trained on as mojibake.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from shitate.errors import DataError, Problem

TEXT_SUFFIXES = (".txt", ".md", ".markdown", ".text")
# Tried in this order: UTF-8 first (a valid UTF-8 file is almost never meant as anything else), then
# Windows' Shift_JIS (cp932, a superset of shift_jis), then EUC-JP.
ENCODINGS = ("utf-8-sig", "cp932", "euc_jp")
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


@dataclass(frozen=True)
class Document:
    """One text to pretrain on, with where it came from (file, and line for JSONL)."""

    text: str
    source: str
    line: int | None = None


def is_text_source(path: Path) -> bool:
    """A folder or a .txt/.md file: read as documents, not as JSONL records."""
    return Path(path).is_dir() or Path(path).suffix.lower() in TEXT_SUFFIXES


def looks_binary(text: str) -> bool:
    """NUL bytes, or more than 1% control characters: an image, an archive or a word-processor file, not text."""
    return "\x00" in text or len(_CONTROL.findall(text)) > 0.01 * max(len(text), 1)


def decode(path: Path, encoding: str | None = None) -> tuple[str, str]:
    """(text, encoding) of a text file, in `encoding` or the one detected; DataError naming the file for binary
    or undecodable content."""
    raw = Path(path).read_bytes()
    if b"\x00" in raw[:8192]:
        raise DataError([Problem(path, None, None, "is a binary file, not text",
                                 "give a .txt/.md file or a {\"text\": …} JSONL; convert PDF or Word files to text first")])
    decoded = {}
    for candidate in (encoding,) if encoding else ENCODINGS:
        try:
            decoded[candidate] = raw.decode(candidate)
        except UnicodeDecodeError as err:
            if encoding:
                raise DataError([Problem(path, None, None, f"is not {encoding} (byte 0x{raw[err.start]:02x} at byte "
                                         f"{err.start + 1})", "leave out --encoding to let shitate detect it")]) from None
            continue
        if candidate == "utf-8-sig":
            break  # valid UTF-8 is taken as UTF-8
    if decoded:
        # EUC-JP bytes often decode as cp932 too, as half-width katakana and rare kanji: keep the reading
        # with the most hiragana, katakana and common kanji.
        encoding = max(decoded, key=lambda e: japanese_score(decoded[e]))
        text = decoded[encoding]
        if looks_binary(text):
            raise DataError([Problem(path, None, None, "is a binary file, not text (many control characters)",
                                     "give a .txt/.md file or a {\"text\": …} JSONL")])
        if encoding.replace("_", "").lower() in ("cp932", "shiftjis", "sjis", "mskanji"):
            text = text.replace("\uff5e", "\u301c")  # cp932 has one wave dash and decodes it as FULLWIDTH TILDE
        return text.replace("\r\n", "\n"), encoding
    raise DataError([Problem(path, None, None, f"is not text in any of {', '.join(ENCODINGS)}",
                             "re-save it as UTF-8 (e.g. `iconv -f ENCODING -t UTF-8`)")])


def japanese_score(text: str) -> int:
    common = sum(1 for c in text if "\u3041" <= c <= "\u30ff" or "\u4e00" <= c <= "\u9fff")
    halfwidth_katakana = sum(1 for c in text if "\uff61" <= c <= "\uff9f")
    return common - 2 * halfwidth_katakana


def text_files(folder: Path, suffixes: tuple[str, ...] = TEXT_SUFFIXES) -> list[Path]:
    """The files with these suffixes (.txt/.md by default) under a folder, in name order, skipping hidden ones."""
    return sorted(p for p in Path(folder).rglob("*") if p.is_file() and p.suffix.lower() in suffixes
                  and not any(part.startswith(".") for part in p.relative_to(folder).parts))


def read_documents(path: Path) -> list[Document]:
    """Every document of a text JSONL, a text file, or a folder of them; all problems raised at once."""
    path = Path(path)
    if not path.exists():
        raise DataError([Problem(path, None, None, "not found",
                                 "check the path (relative paths are read from the recipe's folder)")])
    if path.is_dir():
        files = text_files(path)
        if not files:
            raise DataError([Problem(path, None, None, "has no .txt or .md files", "point data.train at the files' folder")])
        documents = [Document(decode(f)[0].strip(), str(f)) for f in files]
        documents = [d for d in documents if d.text]
    elif path.suffix.lower() in TEXT_SUFFIXES:
        text = decode(path)[0].strip()
        documents = [Document(text, str(path))] if text else []
    else:
        documents = _read_text_jsonl(path)
    if not documents:
        raise DataError([Problem(path, None, None, "has no text", "is the file empty?")])
    return documents


def _read_text_jsonl(path: Path) -> list[Document]:
    documents: list[Document] = []
    problems: list[Problem] = []
    for item in text_jsonl_records(path):
        if isinstance(item, Problem):
            problems.append(item)
        else:
            documents.append(item)
    if problems:
        raise DataError(problems)
    return documents


def text_jsonl_records(path: Path) -> Iterator[Document | Problem]:
    """Each record of a {"text": …} JSONL as a Document, or the Problem that keeps it from being one."""
    text, _ = decode(path)
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            yield Problem(path, number, None, f"not valid JSON ({err.msg} at column {err.colno})",
                          'each line must be one JSON object such as {"text": "…"}')
            continue
        yield text_record_problem(path, number, record) or Document(record["text"].strip(), str(path), number)


def text_record_problem(path: Path, line: int, record: object) -> Problem | None:
    """What is wrong with one {"text": …} record, if anything."""
    if isinstance(record, dict) and "text" not in record and ("messages" in record or "prompt" in record):
        return Problem(path, line, "text", "missing: this is a chat record, and stage pretrain trains on raw text",
                       "use `stage: sft` for chats, or give {\"text\": …} records (`shitate data import` makes them "
                       "from .txt/.md files)")
    if not isinstance(record, dict) or "text" not in record:
        return Problem(path, line, "text", "missing", 'write one {"text": "…"} object a line')
    if not isinstance(record["text"], str):
        return Problem(path, line, "text", f"is {type(record['text']).__name__}, expected a string")
    if not record["text"].strip():
        return Problem(path, line, "text", "is empty", "drop the record")
    if looks_binary(record["text"]):
        return Problem(path, line, "text", "contains binary data (control characters)",
                       "extract the text first; do not embed file contents")
    return None
