"""Find and mask personal data in Japanese and English text (`data scrub`).

Patterns for what has a shape — e-mail addresses, Japanese phone numbers, postal codes, addresses that start
with a prefecture or a city, My Number (checked with its check digit) and card numbers (checked with Luhn) —
and Janome's dictionary (IPADIC's 人名 entries) for person names, since no pattern can tell 山田 from 山道.
A name is masked when the dictionary marks a surname, or a given name next to a surname or before an
honorific (さん, 様, 氏 …): a lone given name is too often an ordinary word (誠, 明).

The same value gets the same placeholder within a file ([NAME_1] stays [NAME_1]), so a scrubbed conversation
still says who answered whom. Full-width digits and hyphens are matched too: patterns run over a one-to-one
half-width view of the text, so offsets are the same in both.
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from shitate.errors import DataError, Problem, require

KINDS = ("EMAIL", "PHONE", "MYNUMBER", "CARD", "POSTAL", "ADDRESS", "NAME")
PREFECTURES = ("北海道 青森県 岩手県 宮城県 秋田県 山形県 福島県 茨城県 栃木県 群馬県 埼玉県 千葉県 "
               "東京都 神奈川県 新潟県 富山県 石川県 福井県 山梨県 長野県 岐阜県 静岡県 愛知県 三重県 "
               "滋賀県 京都府 大阪府 兵庫県 奈良県 和歌山県 鳥取県 島根県 岡山県 広島県 山口県 徳島県 "
               "香川県 愛媛県 高知県 福岡県 佐賀県 長崎県 熊本県 大分県 宮崎県 鹿児島県 沖縄県").split()
# Words of business text that IPADIC also lists as surnames; more go in an allow-list (--allow).
NOT_NAMES = frozenset({"日当"})
HONORIFICS = ("さん", "様", "さま", "氏", "君", "くん", "ちゃん", "先生", "殿", "部長", "課長", "係長", "社長")

_D = r"(?<![0-9])"  # not inside a longer number
_END = r"(?![0-9])"
# Not part of a longer group of digits either: 4111 1111 1111 1112 holds no 12-digit My Number.
_GROUP_START = r"(?<![0-9])(?<![0-9][ \-])"
_GROUP_END = r"(?![ \-]?[0-9])"
_PLACE = r"[一-龥々ぁ-んァ-ヶ]"
_BLOCK = r"(?:[0-9]+(?:丁目|番地|番|号)?|[一二三四五六七八九十]+丁目)(?:-(?=[0-9]))?"
PATTERNS: list[tuple[str, re.Pattern[str]]] = [
    ("EMAIL", re.compile(r"[A-Za-z0-9._%+\-]+@[A-Za-z0-9.\-]+\.[A-Za-z]{2,}")),
    # Cards and My Number before phones: a 16-digit card must not be read as a phone number and a remainder.
    ("CARD", re.compile(_GROUP_START + r"[0-9]{4}(?:[ \-]?[0-9]{4}){2}[ \-]?[0-9]{1,7}" + _GROUP_END)),
    ("MYNUMBER", re.compile(_GROUP_START + r"[0-9]{4}[ \-]?[0-9]{4}[ \-]?[0-9]{4}" + _GROUP_END)),
    # Loose on purpose (+81, brackets, hyphens or none); _valid then wants a Japanese number's 10 or 11 digits.
    ("PHONE", re.compile(r"(?:\+81[ \-]?|(?<![0-9+]))\(?0?[0-9]{1,4}\)?[ \-(]?[0-9]{1,4}\)?[ \-]?[0-9]{3,4}" + _END)),
    ("POSTAL", re.compile(r"〒\s*[0-9]{3}-?[0-9]{4}" + _END
                          + r"|(?<=郵便番号)\s*[:：]?\s*[0-9]{3}-?[0-9]{4}" + _END + "|" + _D + r"[0-9]{3}-[0-9]{4}" + _END
                          + r"(?=\s*(?:" + "|".join(PREFECTURES) + "))")),
    ("ADDRESS", re.compile(r"(?:" + "|".join(PREFECTURES) + rf")(?:{_PLACE}{{1,6}}?[市郡])?{_PLACE}{{1,8}}?[市区町村]"
                           rf"(?:{_PLACE}{{0,10}}?)(?:{_BLOCK}){{1,5}}"
                           + rf"|{_PLACE}{{1,5}}[市]{_PLACE}{{1,5}}?区{_PLACE}{{1,10}}?(?:{_BLOCK}){{2,5}}")),
]


@dataclass(frozen=True)
class Finding:
    """One piece of personal data: where it is (line, offsets in that line), what kind, what it said, its mask."""

    line: int
    start: int
    end: int
    kind: str
    text: str
    mask: str = ""


@dataclass
class Scrubber:
    """Masks personal data, with one placeholder per distinct value for as long as it is used (one file)."""

    allow: frozenset[str] = frozenset()
    kinds: tuple[str, ...] = KINDS
    names: bool = True
    masks: dict[tuple[str, str], str] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)

    def find(self, text: str, line: int = 0) -> list[Finding]:
        """Every finding in text, longest first where two overlap, allow-listed values left out."""
        view = _halfwidth(text)
        candidates: list[Finding] = []
        for kind, pattern in PATTERNS:
            if kind not in self.kinds:
                continue
            for match in pattern.finditer(view):
                value = match.group().lstrip(" :：")
                lead = len(match.group()) - len(value)
                value = value.rstrip()
                if value.count("(") != value.count(")"):  # a bracket around the number, not part of it
                    if value.startswith("("):
                        value, lead = value[1:], lead + 1
                    value = value.removesuffix(")")
                start = match.start() + lead
                if _valid(kind, value):
                    candidates.append(Finding(line, start, start + len(value), kind, text[start:start + len(value)]))
        if self.names and "NAME" in self.kinds:
            candidates += [Finding(line, s, e, "NAME", text[s:e]) for s, e in person_names(text)]
        chosen: list[Finding] = []
        taken = [False] * len(text)
        # Earlier kinds in KINDS win a tie: a number that is both is a card before a phone.
        for finding in sorted(candidates, key=lambda f: (-(f.end - f.start), KINDS.index(f.kind), f.start)):
            if any(taken[finding.start:finding.end]) or self._allowed(finding.text):
                continue
            taken[finding.start:finding.end] = [True] * (finding.end - finding.start)
            chosen.append(finding)
        return sorted(chosen, key=lambda f: f.start)

    def _allowed(self, value: str) -> bool:
        return any(allowed in value or value in allowed for allowed in self.allow)

    def mask(self, finding: Finding) -> str:
        value = _halfwidth(finding.text)
        if finding.kind == "PHONE":
            value = _national(value)
        elif finding.kind in ("CARD", "MYNUMBER", "POSTAL"):
            value = _digits(value)
        key = (finding.kind, re.sub(r"\s", "", unicodedata.normalize("NFKC", value)))
        if key not in self.masks:
            self.counts[finding.kind] = self.counts.get(finding.kind, 0) + 1
            self.masks[key] = f"[{finding.kind}_{self.counts[finding.kind]}]"
        return self.masks[key]

    def scrub(self, text: str, line: int = 0) -> tuple[str, list[Finding]]:
        """The text with every finding masked, and the findings with their masks."""
        findings = [Finding(f.line, f.start, f.end, f.kind, f.text, self.mask(f)) for f in self.find(text, line)]
        out, position = [], 0
        for finding in findings:
            out += [text[position:finding.start], finding.mask]
            position = finding.end
        return "".join(out + [text[position:]]), findings


_WIDTH = str.maketrans({**{chr(0xFF10 + i): str(i) for i in range(10)}, "－": "-", "−": "-", "‐": "-", "‑": "-", "–": "-",
                        "＠": "@", "（": "(", "）": ")", "＋": "+", "．": ".", "\u3000": " "})


def _halfwidth(text: str) -> str:
    # One character for one: offsets in the view are offsets in the text.
    view = text.translate(_WIDTH)
    view = "".join(chr(ord(c) - 0xFEE0) if "\uff21" <= c <= "\uff5a" else c for c in view)
    return re.sub(r"(?<=[0-9])ー(?=[0-9])", "-", view)  # 03ー1234ー5678, a katakana long mark typed for a hyphen


def _digits(value: str) -> str:
    return re.sub(r"[^0-9]", "", value)


def _valid(kind: str, value: str) -> bool:
    if kind == "CARD":
        return 13 <= len(_digits(value)) <= 19 and luhn_valid(_digits(value))
    if kind == "MYNUMBER":
        return my_number_valid(_digits(value))
    if kind == "PHONE":
        national = _national(value)
        if not national.startswith("0") or len(national) not in (10, 11):
            return False
        # Without a separator, only the shapes of mobile (090…) and landline numbers: not any 10 digits after a 0.
        return bool(re.search(r"[ \-()]", value)) or bool(re.fullmatch(r"0[5789]0[0-9]{8}|0[1-9][0-9]{8}", national))
    return True


def _national(phone: str) -> str:
    """A phone number's digits in national form: +81 3-1234-5678 and 03-1234-5678 are the same number."""
    digits = _digits(phone)
    return "0" + digits[2:].removeprefix("0") if phone.startswith("+81") else digits


def luhn_valid(digits: str) -> bool:
    """The Luhn checksum every payment card number satisfies."""
    total = 0
    for position, digit in enumerate(reversed(digits)):
        value = int(digit) * (2 if position % 2 else 1)
        total += value - 9 if value > 9 else value
    return total % 10 == 0


def my_number_valid(digits: str) -> bool:
    """個人番号 check digit (行政手続における特定の個人を識別するための番号の利用等に関する法律施行令 第8条)."""
    if len(digits) != 12 or len(set(digits)) == 1:
        return False
    body = [int(d) for d in digits[:11]]
    # P_n is the n-th digit counted from the right of the first eleven; Q_n = n + 1 (n ≤ 6), n − 5 (n ≥ 7).
    total = sum(p * (n + 1 if n <= 6 else n - 5) for n, p in enumerate(reversed(body), start=1))
    remainder = total % 11
    return int(digits[11]) == (0 if remainder <= 1 else 11 - remainder)


@lru_cache(maxsize=1)
def _tokenizer():  # noqa: ANN202 - janome Tokenizer
    return require("janome.tokenizer", "documents", "finding person names (--no-names masks patterns only)",
                   package="janome").Tokenizer()


def person_names(text: str) -> list[tuple[int, int]]:
    """(start, end) of each person name the dictionary marks: a surname (with the given name after it), or a
    given name before an honorific."""
    tokens = []
    position = 0
    for token in _tokenizer().tokenize(text):
        start = text.index(token.surface, position)
        position = start + len(token.surface)
        tokens.append((start, position, token.surface, token.part_of_speech.split(",")))
    spans = []
    index = 0
    while index < len(tokens):
        start, end, surface, pos = tokens[index]
        if pos[:3] == ["名詞", "固有名詞", "人名"]:
            kinds = [pos[3]]
            last = index
            # Surname, optional space, given name: one person, one span.
            while last + 1 < len(tokens):
                following = last + 1
                if tokens[following][2].isspace() and following + 1 < len(tokens):
                    following += 1  # 田中 花子: the space between surname and given name
                if tokens[following][3][:3] == ["名詞", "固有名詞", "人名"]:
                    kinds.append(tokens[following][3][3])
                    last = following
                else:
                    break
            end = tokens[last][1]
            before = index - 1 - (index > 1 and tokens[index - 1][2].isspace())
            if kinds[0] == "名" and before >= 0 and tokens[before][3][:2] == ["名詞", "固有名詞"] \
                    and len(tokens[before][2]) >= 2:
                # 石川 明美: a surname the dictionary knows only as a place, before a given name
                start, kinds = tokens[before][0], ["姓"] + kinds
            after = text[end:end + 3].lstrip()
            honorific = after.startswith(HONORIFICS)
            if text[start:end] in NOT_NAMES:
                pass
            elif "姓" in kinds and (len(text[start:end]) >= 2 or honorific) or honorific:
                spans.append((start, end))
            index = last + 1
        else:
            index += 1
    return spans


# ---------------------------------------------------------------------------------------------------------------
# Files


def scrub_lines(lines: Sequence[str], scrubber: Scrubber, jsonl: bool,
                path: Path | str = "") -> Iterator[tuple[str, list[Finding]]]:
    """Each line scrubbed (for JSONL: every string inside the record but roles), with its findings.

    A JSONL's lines are all parsed first: a broken line stops the scrub before anything is masked, with every
    broken line listed."""
    records: dict[int, Any] = {}
    if jsonl:
        problems = []
        for number, line in enumerate(lines, start=1):
            if line.strip():
                try:
                    records[number] = json.loads(line)
                except json.JSONDecodeError as err:
                    problems.append(Problem(path, number, None, f"not valid JSON ({err.msg} at column {err.colno})",
                                            "fix the line, or scrub the file as text by renaming it to .txt"))
        if problems:
            raise DataError(problems)
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            yield line, []
        elif not jsonl:
            yield scrubber.scrub(line, number)
        else:
            found: list[Finding] = []
            yield json.dumps(_scrub_strings(records[number], scrubber, number, found), ensure_ascii=False), found


def _scrub_strings(value: Any, scrubber: Scrubber, line: int, found: list[Finding]) -> Any:
    """Every string of a JSON value scrubbed (roles left alone), the findings appended to `found`."""
    if isinstance(value, str):
        text, findings = scrubber.scrub(value, line)
        found.extend(findings)
        return text
    if isinstance(value, list):
        return [_scrub_strings(v, scrubber, line, found) for v in value]
    if isinstance(value, dict):
        return {k: (v if k == "role" else _scrub_strings(v, scrubber, line, found)) for k, v in value.items()}
    return value


# ---------------------------------------------------------------------------------------------------------------
# Measuring: a labelled file marks each piece of personal data as ⟦KIND:text⟧

_LABEL = re.compile(r"⟦([A-Z]+):(.+?)⟧")


def unlabel(line: str) -> tuple[str, set[tuple[int, int, str]]]:
    """A labelled line's plain text and its gold (start, end, kind) spans."""
    text, spans, position = [], set(), 0
    for match in _LABEL.finditer(line):
        text.append(line[position:match.start()])
        start = sum(len(part) for part in text)
        text.append(match.group(2))
        spans.add((start, start + len(match.group(2)), match.group(1)))
        position = match.end()
    text.append(line[position:])
    return "".join(text), spans


def measure(lines: Iterable[str], scrubber: Scrubber | None = None) -> dict[str, dict[str, float]]:
    """Precision, recall and F1 per kind and overall; a finding counts only with the exact span and kind."""
    scrubber = scrubber or Scrubber()
    counts = {kind: {"tp": 0, "fp": 0, "fn": 0} for kind in KINDS}
    for line in lines:
        if not line.strip() or line.startswith("#"):
            continue
        text, gold = unlabel(line.rstrip("\n"))
        found = {(f.start, f.end, f.kind) for f in scrubber.find(text)}
        for span in found | gold:
            outcome = "tp" if span in found and span in gold else "fp" if span in found else "fn"
            counts[span[2]][outcome] += 1
    counts["all"] = {key: sum(c[key] for c in counts.values()) for key in ("tp", "fp", "fn")}
    scores = {}
    for kind, c in counts.items():
        precision = c["tp"] / (c["tp"] + c["fp"]) if c["tp"] + c["fp"] else 1.0
        recall = c["tp"] / (c["tp"] + c["fn"]) if c["tp"] + c["fn"] else 1.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        scores[kind] = {"precision": precision, "recall": recall, "f1": f1, **c}
    return scores
