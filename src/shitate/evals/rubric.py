"""Rule checks declared in a recipe, scored per answer and in total."""

from __future__ import annotations

import json
import re
from collections.abc import Callable

from shitate.config import RubricCheck

# Japanese and Western sentence ends; a newline also ends a sentence in chat answers.
_SENTENCE_END = re.compile(r"[。．！？!?\n]+")


def count_sentences(text: str) -> int:
    """Sentences in `text`: non-empty pieces between sentence-ending marks."""
    return sum(1 for piece in _SENTENCE_END.split(text.strip()) if piece.strip(" 　」』)）"))


_KANA_KANJI = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uff66-\uff9f]")


def japanese_share(text: str) -> float:
    """Share of letters that are kana or kanji (spaces, digits and punctuation are not counted)."""
    letters = [c for c in text if c.isalpha()]
    return sum(bool(_KANA_KANJI.match(c)) for c in letters) / len(letters) if letters else 0.0


def passes(check: RubricCheck, answer: str) -> bool:
    """Whether one answer meets one check."""
    text = answer.strip()
    values = check.values or ([] if check.value is None else [str(check.value)])
    if check.check == "ends_with":
        return any(text.endswith(v) for v in values)
    if check.check == "max_sentences":
        return 0 < count_sentences(text) <= int(check.value or 1)
    if check.check == "contains":
        return any(v in text for v in values)
    if check.check == "not_contains":
        return not any(v in text for v in values)
    if check.check == "max_chars":
        return len(text) <= int(check.value or 0)
    if check.check == "regex":
        return any(re.search(v, text) for v in values)
    if check.check == "is_json":
        try:
            json.loads(text)
        except ValueError:
            return False
        return True
    if check.check == "japanese":
        return japanese_share(text) >= float(check.value or 0.5)
    raise ValueError(f"unknown rubric check {check.check!r}")


def score(checks: list[RubricCheck], answers: list[str]) -> dict[str, int]:
    """How many answers pass each check, by check name."""
    return {check.name: sum(passes(check, a) for a in answers) for check in checks}


def reward(checks: list[RubricCheck]) -> Callable[[list[str]], list[float]]:
    """The rubric as a reward for ppo/grpo: the share of its checks each answer passes (0 to 1)."""
    def share_passed(answers: list[str]) -> list[float]:
        return [sum(passes(check, answer) for check in checks) / len(checks) for answer in answers]

    return share_passed
