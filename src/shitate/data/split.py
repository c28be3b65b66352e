"""Seeded train/validation/test split that keeps repeated questions (all pairs of one prompt, all questions about
one passage) in one split."""

from __future__ import annotations

import hashlib
import random
from typing import Any

from shitate.errors import ShitateError

SPLITS = ("train", "validation", "test")


def parse_sizes(spec: str) -> list[float]:
    """`70/30/30` (counts) or `0.8/0.1/0.1` (fractions) → three numbers."""
    try:
        sizes = [float(part) for part in spec.replace(",", "/").split("/")]
    except ValueError:
        raise ShitateError(f"--sizes {spec!r}: expected three numbers such as 70/30/30 or 0.8/0.1/0.1") from None
    if len(sizes) != 3 or any(s < 0 for s in sizes):
        raise ShitateError(f"--sizes {spec!r}: expected three non-negative numbers: train/validation/test")
    return sizes


def question_group(record: dict[str, Any]) -> str:
    # Grouping by the user side means a question asked twice (even with different answers), or
    # a prompt with several preference pairs, cannot be trained on and then "held out". Questions about one
    # passage share its answer: they are grouped by the passage.
    if record.get("context"):
        return hashlib.sha256(" ".join(str(record["context"]).split()).encode()).hexdigest()
    if "messages" not in record:
        from shitate.data.preference import prompt_key

        return hashlib.sha256(prompt_key(record).encode()).hexdigest()
    prompts = [" ".join(m["content"].split()) for m in record["messages"] if m["role"] == "user"]
    return hashlib.sha256("\x1e".join(prompts).encode()).hexdigest()


def split_records(records: list[dict[str, Any]], sizes: list[float], seed: int = 42) -> dict[str, list[dict[str, Any]]]:
    """Shuffle groups of identical questions with `seed` and deal them into three splits."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for record in records:
        groups.setdefault(question_group(record), []).append(record)
    order = list(groups.values())
    random.Random(seed).shuffle(order)
    total = len(records)
    fractions = all(s <= 1 for s in sizes) and abs(sum(sizes) - 1) < 1e-6
    if fractions:
        targets = [round(s * total) for s in sizes[:2]]
        targets.append(total - sum(targets))
    elif all(s == int(s) for s in sizes):
        targets = [int(s) for s in sizes]
        if sum(targets) > total:
            raise ShitateError(f"--sizes asks for {sum(targets)} records but the file has {total}; lower the counts")
    else:
        raise ShitateError("--sizes: give whole counts (70/30/30) or fractions that sum to 1 (0.8/0.1/0.1)")
    dealt: dict[str, list[list[dict[str, Any]]]] = {name: [] for name in SPLITS}
    filled = dict.fromkeys(SPLITS, 0)
    for group in order:
        for name, target in zip(SPLITS, targets):
            if filled[name] + len(group) <= target:
                dealt[name].append(group)
                filled[name] += len(group)
                break
        else:
            if fractions:  # groups that fit nowhere exactly: train rather than nowhere (counts are taken as asked)
                dealt["train"].append(group)
    if fractions:
        # A few records with groups of two can fill train before a tenth rounds to one record (9 records of 7
        # passages at 0.8/0.1/0.1 gave 9/0/0): a split asked for gets train's last group while train keeps one.
        for name, size in zip(SPLITS[1:], sizes[1:]):
            if size > 0 and not dealt[name] and len(dealt["train"]) > 1:
                dealt[name].append(dealt["train"].pop())
    return {name: [record for group in groups for record in group] for name, groups in dealt.items()}
