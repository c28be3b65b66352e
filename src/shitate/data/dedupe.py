"""Exact and near-duplicate records, and training examples that leak test questions.

Near duplicates are found with MinHash/LSH (datasketch) over character 3-grams — Japanese has no spaces to
split words on, and 3-grams of characters catch a reworded particle or an added 「ください」 as well. LSH only
proposes candidates; each pair is then measured exactly (Jaccard of the 3-gram sets), and that figure is
what is reported and compared with the threshold.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shitate.errors import DataError, Problem, require

SHINGLE = 3
NUM_PERM = 128


@dataclass(frozen=True)
class Match:
    """Record `index` repeats record `of` (in the same file, or in the file compared against) with this similarity."""

    index: int
    of: int
    similarity: float


def record_text(record: dict[str, Any], part: str = "question") -> str:
    """What two records are compared on: the user's turns (question), or the whole record (all)."""
    if "messages" in record:
        roles = ("user",) if part == "question" else ("system", "user", "assistant")
        text = "\n".join(m.get("content", "") for m in record["messages"] if m.get("role") in roles)
        return text if part == "question" else f"{record.get('context', '')}\n{text}"
    if "prompt" in record:
        from shitate.data.preference import prompt_key

        return prompt_key(record) if part == "question" else f"{prompt_key(record)}\n{record.get('chosen')}"
    return str(record.get("text", ""))


def _canonical(text: str) -> str:
    # Width, case and spacing differences are not differences in what is asked.
    return re.sub(r"\s+", "", unicodedata.normalize("NFKC", text)).lower()


def shingles(canonical: str) -> set[str]:
    if len(canonical) <= SHINGLE:
        return {canonical}
    return {canonical[i:i + SHINGLE] for i in range(len(canonical) - SHINGLE + 1)}


def jaccard(a: set[str], b: set[str]) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0


def near_duplicate_backend() -> Any:
    """datasketch, or an error naming the extra that brings it: callers with slow work ahead ask first."""
    return require("datasketch", "documents", "near-duplicate search")


class _Index:
    """Texts to compare against: exact repeats by hash of the canonical form, near ones by MinHash/LSH candidates
    measured exactly."""

    def __init__(self, threshold: float) -> None:
        datasketch = near_duplicate_backend()
        self.threshold = threshold
        self._minhash = datasketch.MinHash
        # LSH misses some pairs just above its threshold: ask it for a little less, then measure each pair exactly.
        self._lsh = datasketch.MinHashLSH(threshold=max(0.05, threshold - 0.1), num_perm=NUM_PERM)
        self._exact: dict[str, int] = {}
        self._grams: dict[int, set[str]] = {}

    def _signature(self, grams: set[str]) -> Any:
        signature = self._minhash(num_perm=NUM_PERM, seed=1)
        signature.update_batch([g.encode("utf-8") for g in grams])
        return signature

    def match(self, text: str) -> tuple[tuple[int, float] | None, Any]:
        """(the key of the indexed text it repeats and the similarity, or None; what `add` needs to index it)."""
        canonical = _canonical(text)
        digest = hashlib.sha256(canonical.encode()).hexdigest()
        if digest in self._exact:
            return (self._exact[digest], 1.0), None
        grams = shingles(canonical)
        signature = self._signature(grams)
        best = max(((jaccard(grams, self._grams[int(key)]), int(key)) for key in self._lsh.query(signature)),
                   default=(0.0, -1))
        return ((best[1], best[0]) if best[0] >= self.threshold else None), (digest, grams, signature)

    def add(self, key: int, indexed: Any) -> None:
        digest, grams, signature = indexed
        self._exact[digest], self._grams[key] = key, grams
        self._lsh.insert(str(key), signature)


def duplicates(texts: Sequence[str], threshold: float = 0.8) -> list[Match]:
    """Each text that repeats (exactly, or with similarity ≥ threshold) an earlier kept one, with the one it repeats."""
    index, found = _Index(threshold), []
    for position, text in enumerate(texts):
        match, indexed = index.match(text)
        if match:
            found.append(Match(position, *match))
        else:
            index.add(position, indexed)
    return found


def leaks(train: Sequence[str], test: Sequence[str], threshold: float = 0.8) -> list[Match]:
    """Each training text that repeats or nearly repeats a test text (`of` indexes the test texts)."""
    index = _Index(threshold)
    for position, text in enumerate(test):
        match, indexed = index.match(text)
        if indexed is not None:  # a test question asked twice is indexed once
            index.add(position, indexed)
    return [Match(position, *match) for position, text in enumerate(train) if (match := index.match(text)[0])]


def _numbered_records(path: Path) -> list[tuple[int, dict[str, Any]]]:
    from shitate.data.formats import read_jsonl

    records, problems = [], []
    for line, record in read_jsonl(Path(path)):
        if isinstance(record, Problem):
            problems.append(record)
        elif isinstance(record, dict):
            records.append((line, record))
        else:
            problems.append(Problem(path, line, None, "is not a JSON object"))
    if problems:
        raise DataError(problems)
    return records


def dedupe_file(path: Path, part: str = "question", threshold: float = 0.8) -> tuple[list[dict[str, Any]], list[Problem]]:
    """The records of a JSONL without repeats (the first of each kept), and one note per record dropped."""
    numbered = _numbered_records(path)
    matches = duplicates([record_text(r, part) for _, r in numbered], threshold)
    dropped = {m.index: m for m in matches}
    notes = [Problem(path, numbered[m.index][0], None, f"repeats line {numbered[m.of][0]}"
                     + ("" if m.similarity == 1.0 else f" (similarity {m.similarity:.2f})")) for m in matches]
    return [r for i, (_, r) in enumerate(numbered) if i not in dropped], notes


def leakage_problems(train: Path, test: Path, threshold: float = 0.8) -> tuple[list[Problem], list[Problem]]:
    """(errors, warnings): training records that repeat a test question exactly, and those that nearly do."""
    train_records, test_records = _numbered_records(train), _numbered_records(test)
    matches = leaks([record_text(r) for _, r in train_records], [record_text(r) for _, r in test_records], threshold)
    errors, warnings = [], []
    for m in matches:
        where = f"{test}:{test_records[m.of][0]}"
        if m.similarity == 1.0:
            errors.append(Problem(train, train_records[m.index][0], None, f"repeats the test question at {where}",
                                  "drop it from the training data (it inflates test scores), e.g. with `shitate data "
                                  "split` on the combined file"))
        else:
            warnings.append(Problem(train, train_records[m.index][0], None, f"nearly repeats the test question at "
                                    f"{where} (similarity {m.similarity:.2f})", "check whether it is the same question"))
    return errors, warnings
