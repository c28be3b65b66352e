"""Company documents → passages: read Markdown, text, HTML, PDF and DOCX, normalise Japanese, split by heading and article.

Every reader turns its file into Markdown-like lines (a heading is `#`…), so one splitter serves all formats.
A passage is a text record `{"text", "source", "heading"}` that stage pretrain reads as it is and `data synth`
turns into question/answer pairs; `text` starts with the section's own heading so that a passage read alone
still says which rule it is.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from html.parser import HTMLParser
from pathlib import Path

from shitate.data.formats import read_jsonl
from shitate.data.text import decode, text_files, text_record_problem
from shitate.errors import DataError, Problem, require

DOCUMENT_SUFFIXES = (".md", ".markdown", ".txt", ".text", ".html", ".htm", ".pdf", ".docx")
# 第12条, 第十二条, 第12条の2: articles of Japanese rules, often written without any Markdown heading.
ARTICLE = re.compile(r"^第\s*[0-9一二三四五六七八九十百〇]+\s*条(の[0-9一二三四五六七八九十]+)?(?=[\s　（(]|$)")
CHAPTER = re.compile(r"^第\s*[0-9一二三四五六七八九十百〇]+\s*[章節編](?=[\s　]|$)")
_HEADING = re.compile(r"^(#{1,6})\s+(.*)$")
_CAPTION = re.compile(r"[（(][^（()）。]{1,20}[)）]")
_LIST_ITEM = re.compile(r"^\s*([-*+・•]|\d+[.)．]|[（(][0-9０-９一二三四五六七八九十]+[)）]|[①-⑳])\s*")
_SENTENCE_END = re.compile(r"(?<=[。！？!?])")
_ENDS_SENTENCE = ("。", "！", "？", "!", "?", "」", "』", "）", ")", ":", "：")
_JAPANESE = re.compile(r"[\u3040-\u30ff\u3400-\u9fff\uff01-\uff5e]")


@dataclass(frozen=True)
class Passage:
    """A piece of a document small enough to be a model's context, and where it came from."""

    text: str
    source: str
    heading: str

    def record(self) -> dict[str, str]:
        return asdict(self)


# ---------------------------------------------------------------------------------------------------------------
# Reading: every format → lines of Markdown-like text


def read_lines(path: Path) -> list[str]:
    """A document's text as lines, headings as `#` lines; DataError naming the file when it cannot be read."""
    suffix = path.suffix.lower()
    if suffix == ".pdf":
        return _pdf_lines(path)
    if suffix == ".docx":
        return _docx_lines(path)
    text, _ = decode(path)
    if suffix in (".html", ".htm"):
        return _html_lines(text)
    return text.splitlines()


def _pdf_lines(path: Path) -> list[str]:
    pypdf = require("pypdf", "documents", "reading PDF")
    try:
        reader = pypdf.PdfReader(str(path))
        # A PDF "encrypted" with an empty user password (common for copy protection) opens without one.
        if reader.is_encrypted and not reader.decrypt(""):
            raise DataError([Problem(path, None, None, "is an encrypted PDF that needs a password",
                                     "save an unprotected copy (or export its text) and import that")])
        pages = [page.extract_text() or "" for page in reader.pages]
    except DataError:
        raise
    except Exception as err:  # pypdf raises many types for damaged files; all mean the same to the user
        raise DataError([Problem(path, None, None, f"is not a readable PDF ({type(err).__name__}: {err})",
                                 "open it in a PDF viewer; re-save or export it as text")]) from err
    if not any(page.strip() for page in pages):
        raise DataError([Problem(path, None, None, "has no text layer (a scanned PDF?)",
                                 "run OCR on it first (e.g. ocrmypdf) or give the text as .txt")])
    return [line for page in pages for line in page.splitlines()]


def _docx_lines(path: Path) -> list[str]:
    docx = require("docx", "documents", "reading Word files", package="python-docx")
    try:
        document = docx.Document(str(path))
    except Exception as err:
        raise DataError([Problem(path, None, None, f"is not a readable Word file ({type(err).__name__})",
                                 "open and re-save it as .docx in Word or LibreOffice")]) from err
    lines = []
    for paragraph in document.paragraphs:
        style = (paragraph.style.name if paragraph.style is not None else "") or ""
        level = re.search(r"(?:Heading|見出し)\s*(\d)", style)
        if style == "Title":
            lines.append(f"# {paragraph.text}")
        elif level:
            lines.append(f"{'#' * min(6, int(level.group(1)) + 1)} {paragraph.text}")
        else:
            lines.append(paragraph.text)
    for table in document.tables:  # tables after the text: their rows rarely read as sentences anyway
        lines.extend(" | ".join(cell.text.strip() for cell in row.cells) for row in table.rows)
    return lines


class _HtmlText(HTMLParser):
    """HTML → lines with `#` headings. The standard parser suffices: we need headings and block breaks, not layout."""

    BLOCKS = {"p", "div", "li", "tr", "br", "section", "article", "table", "ul", "ol", "dd", "dt", "pre", "blockquote"}
    SKIP = {"script", "style", "noscript", "head", "nav", "footer"}

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.lines: list[str] = [""]
        self._skipping = 0

    def handle_starttag(self, tag: str, attrs: list) -> None:
        if tag in self.SKIP:
            self._skipping += 1
        elif re.fullmatch(r"h[1-6]", tag):
            self.lines += ["#" * int(tag[1]) + " "]
        elif tag in self.BLOCKS:
            self.lines.append("")

    def handle_endtag(self, tag: str) -> None:
        if tag in self.SKIP:
            self._skipping = max(0, self._skipping - 1)
        elif re.fullmatch(r"h[1-6]", tag) or tag in self.BLOCKS:
            self.lines.append("")

    def handle_data(self, data: str) -> None:
        if not self._skipping:
            self.lines[-1] += re.sub(r"\s+", " ", data)


def _html_lines(text: str) -> list[str]:
    parser = _HtmlText()
    parser.feed(text)
    return [line.strip() for line in parser.lines]


# ---------------------------------------------------------------------------------------------------------------
# Normalising Japanese text

# Full NFKC also rewrites what a rule means (①→1, ㈱→(株), 「…」 stays but ～→~, ％ is fine): apply it only to
# full-width ASCII letters and digits and half-width katakana, where it is always safe.
_NFKC_SAFE = re.compile(r"[\uff10-\uff19\uff21-\uff3a\uff41-\uff5a\uff61-\uff9f]+")


def normalise(line: str) -> str:
    """One line, normalised: safe NFKC, full-width spaces as spaces, one kind of wave dash, no trailing space."""
    line = _NFKC_SAFE.sub(lambda m: unicodedata.normalize("NFKC", m.group()), line)
    # cp932 decodes the wave dash as FULLWIDTH TILDE; both mean 〜 (from … to …) in Japanese prose.
    line = line.replace("\uff5e", "\u301c").replace("\u3000", " ")
    return re.sub(r"[ \t]+", " ", line).strip()


def join_broken_lines(lines: list[str]) -> list[str]:
    """Join lines a PDF or a hard-wrapped text broke inside a sentence; keep headings, list items and blank lines."""
    joined: list[str] = []
    for line in lines:
        previous = joined[-1] if joined else ""
        if (line and previous and not _HEADING.match(previous) and not _HEADING.match(line)
                and not previous.endswith(_ENDS_SENTENCE) and not _LIST_ITEM.match(line)
                and not line.startswith("|") and not previous.startswith("|")
                and not ARTICLE.match(line) and not CHAPTER.match(line)
                and not ARTICLE.match(previous) and not CHAPTER.match(previous)):
            # Japanese is written without spaces between words; a break between two Latin words was a space.
            glue = "" if _JAPANESE.match(previous[-1]) or _JAPANESE.match(line[0]) else " "
            joined[-1] = previous + glue + line
        else:
            joined.append(line)
    return joined


# ---------------------------------------------------------------------------------------------------------------
# Splitting: headings and articles first, then by length with overlap


def sections(lines: list[str]) -> Iterator[tuple[list[str], list[str]]]:
    """(heading path, body lines) for each heading or article; a bare 第N条 line counts as a heading."""
    path: list[tuple[int, str]] = []
    body: list[str] = []

    def flush() -> Iterator[tuple[list[str], list[str]]]:
        if any(line.strip() for line in body):
            yield [title for _, title in path], [line for line in body if line.strip()]

    for line in lines:
        heading, article = _HEADING.match(line), None
        if heading:
            level, title = len(heading.group(1)), heading.group(2).strip()
        elif CHAPTER.match(line):
            level, title = 7, line  # below any Markdown heading of the same document
        elif article := ARTICLE.match(line):
            level, title = 8, line
        else:
            body.append(line)
            continue
        first_sentence = ""
        if article is not None:
            # Laws put an article's caption on the line before it — （目的）/第1条 この規則は… — and its first
            # sentence on the article's own line; a short text without 。 after the number is the caption itself.
            number = article.group()
            rest = line[len(number):].strip()
            caption = body.pop() if body and _CAPTION.fullmatch(body[-1]) else ""
            if rest.startswith(("（", "(")) and rest.find("）") > 0:
                caption, rest = rest[:rest.find("）") + 1], rest[rest.find("）") + 1:].strip()
            if rest and not rest.endswith("。") and len(rest) <= 20 and not caption:
                caption, rest = rest, ""
            title, first_sentence = (number + caption if caption.startswith(("（", "(")) else f"{number} {caption}".strip()), rest
        yield from flush()
        body = [first_sentence] if first_sentence else []
        path = [(lvl, t) for lvl, t in path if lvl < level] + [(level, title)]
    yield from flush()


def chunks(text: str, max_chars: int, overlap: int) -> list[str]:
    """Text cut at sentence ends into pieces of at most max_chars, each starting with the previous one's last
    `overlap` characters' worth of whole sentences (a fact split across two passages is whole in one of them)."""
    if max_chars <= 0 or len(text) <= max_chars:
        return [text]
    # Sentences keep the line break that ended their line, so list items and table rows stay on their own lines.
    sentences = []
    for line in text.split("\n"):
        parts = [part for part in _SENTENCE_END.split(line) if part.strip()]
        sentences += parts[:-1] + [parts[-1] + "\n"] if parts else []
    pieces: list[str] = []
    current: list[str] = []
    for sentence in sentences:
        while len(sentence) > max_chars:  # one sentence longer than a passage: cut it by characters
            if current:
                pieces.append("".join(current))
                current = []
            pieces.append(sentence[:max_chars])
            sentence = sentence[max(1, max_chars - overlap):]
        if current and sum(map(len, current)) + len(sentence) > max_chars:
            pieces.append("".join(current))
            carried: list[str] = []
            for previous in reversed(current):
                if sum(map(len, carried)) + len(previous) > overlap:
                    break
                carried.insert(0, previous)
            current = carried
        current.append(sentence)
    if current and (not pieces or "".join(current) not in pieces[-1]):
        pieces.append("".join(current))
    return [piece.strip() for piece in pieces]


def passages(path: Path, max_chars: int = 800, overlap: int = 100) -> list[Passage]:
    """One document's passages; DataError if the file cannot be read or holds no text."""
    lines = join_broken_lines([normalise(line) for line in read_lines(path)])
    found = []
    for heading_path, body in sections(lines):
        title = heading_path[-1] if heading_path else ""
        room = max_chars - len(title) - 1 if max_chars > 0 else 0
        for piece in chunks("\n".join(body), max(room, max_chars // 2) if max_chars > 0 else 0, overlap):
            found.append(Passage(f"{title}\n{piece}" if title else piece, str(path), " > ".join(heading_path)))
    if not found:
        raise DataError([Problem(path, None, None, "has no text", "is the file empty, or only headings?")])
    return found


def import_documents(source: Path, max_chars: int = 800, overlap: int = 100,
                     skip_bad: bool = False) -> tuple[list[Passage], list[Problem], int]:
    """Passages of a document or of every document in a folder, the problems of the files skipped, the files read.

    Without skip_bad, any bad file stops the import with all problems listed (nothing is written).
    """
    source = Path(source)
    if not source.exists():
        raise DataError([Problem(source, None, None, "not found", "check the path")])
    files = text_files(source, DOCUMENT_SUFFIXES) if source.is_dir() else [source]
    if not files:
        raise DataError([Problem(source, None, None, "has no documents (" + ", ".join(DOCUMENT_SUFFIXES) + ")",
                                 "point it at the folder that holds the files")])
    found, problems = [], []
    for file in files:
        try:
            found.extend(passages(file, max_chars, overlap))
        except DataError as err:
            problems.extend(err.problems)
    if problems and not skip_bad:
        raise DataError(problems + [Problem(source, None, None, f"{len(problems)} of {len(files)} files could not be "
                                            "read", "fix or remove them, or pass --skip-bad to import the rest")])
    if not found:
        raise DataError(problems or [Problem(source, None, None, "has no text")])
    return found, problems, len(files)


def read_passages(path: Path) -> list[dict[str, str]]:
    """The passages of a text JSONL (`data import`'s output, or any {"text": …} file), every problem raised at once."""
    records, problems = [], []
    for line, obj in read_jsonl(Path(path)):
        problem = obj if isinstance(obj, Problem) else text_record_problem(path, line, obj)
        if problem is not None:
            problems.append(problem)
        elif isinstance(obj, dict):  # text_record_problem found none, so it is a dict with text
            records.append({"text": obj["text"].strip(), "source": str(obj.get("source", path)),
                            "heading": str(obj.get("heading", ""))})
    if problems:
        raise DataError(problems)
    if not records:
        raise DataError([Problem(path, None, None, "has no passages", "make them with `shitate data import DOCS/`")])
    return records
