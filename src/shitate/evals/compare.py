"""`shitate compare`: the same questions to two models, side by side, scored by the recipe's rubric."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from shitate.config import GenerateSpec, RubricCheck
from shitate.data.formats import read_questions, write_jsonl
from shitate.evals.rubric import passes
from shitate.progress import console, work_bar


def compare(base: str, tuned: str, prompts_path: Path, out: Path, spec: GenerateSpec, rubric: list[RubricCheck],
            system: str | None = None, template: str = "auto") -> list[dict[str, Any]]:
    """Answer every prompt with both models and save the rows (with rubric results) to `out`."""
    from shitate.models.inference import answer, load_for_inference

    items = read_questions(prompts_path, system)
    conversations = [item["messages"] for item in items]
    answers: dict[str, list[str]] = {}
    for side, reference in (("base", base), ("tuned", tuned)):
        loaded = load_for_inference(reference, template)
        with work_bar() as progress:
            task = progress.add_task(f"{side}: answering {len(items)} prompts", total=len(items))
            answers[side] = answer(loaded, conversations, spec, on_batch=lambda n, task=task: progress.advance(task, n))
        del loaded
    rows = []
    for item, base_answer, tuned_answer in zip(items, answers["base"], answers["tuned"]):
        question = item["messages"][-1]["content"]
        row = {"question": question, "base": base_answer, "tuned": tuned_answer, "reference": item["reference"]}
        if rubric:
            row["rubric"] = {side: {c.name: passes(c, row[side]) for c in rubric} for side in ("base", "tuned")}
        rows.append(row)
    write_jsonl(out, rows)
    return rows


def print_comparison(rows: list[dict[str, Any]], rubric: list[RubricCheck], base: str, tuned: str) -> None:
    """Side-by-side answers, then the rubric totals for each model."""
    from rich.table import Table

    table = Table(show_lines=True, title="base vs tuned")
    table.add_column("question", ratio=2, overflow="fold")
    table.add_column(f"base ({base})", ratio=3, overflow="fold")
    table.add_column(f"tuned ({tuned})", ratio=3, overflow="fold")
    for row in rows:
        table.add_row(row["question"], _clip(row["base"]), _clip(row["tuned"]))
    console.print(table)
    if rubric:
        summary = Table(title="rubric: answers that pass")
        summary.add_column("check")
        summary.add_column("base", justify="right")
        summary.add_column("tuned", justify="right")
        for check in rubric:
            counts = [sum(r["rubric"][side][check.name] for r in rows) for side in ("base", "tuned")]
            summary.add_row(check.name, *(f"{c}/{len(rows)}" for c in counts))
        console.print(summary)


def _clip(text: str, limit: int = 120) -> str:
    text = " ".join(text.split())  # a rambling base model's line breaks would make the table unreadable
    return text if len(text) <= limit else text[:limit] + " …"


def rubric_totals(rows: list[dict[str, Any]], rubric: list[RubricCheck]) -> dict[str, dict[str, int]]:
    """{side: {check name: passes}} for a summary line or a README table."""
    return {side: {c.name: sum(r["rubric"][side][c.name] for r in rows) for c in rubric} for side in ("base", "tuned")}

