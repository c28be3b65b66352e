"""`shitate eval`: the same questions and tasks for each model, then one report.

For a run folder, the two sides are its base model and the tuned run, asked the recipe's
test questions with the recipe's generation settings and scored by its rubric and by
reference metrics; `--tasks` adds JGLUE. Answers are cached per side as they are produced,
so an interrupted evaluation resumes where it stopped.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from shitate.config import GenerateSpec, Recipe
from shitate.errors import ShitateError
from shitate.evals import metrics
from shitate.evals.rubric import passes
from shitate.evals.tasks import jglue
from shitate.progress import say, status


def _cached_answers(path: Path, conversations: list[list[dict[str, str]]], loaded: Any, spec: GenerateSpec) -> list[str]:
    """Answers for each conversation, reusing what an earlier (interrupted) evaluation saved."""
    from shitate.models.inference import answer

    done = [json.loads(line)["answer"] for line in path.read_text(encoding="utf-8").splitlines()] if path.is_file() else []
    with status(f"answering {len(conversations) - len(done)} questions…"):
        for start in range(len(done), len(conversations), spec.batch_size):
            batch = answer(loaded, conversations[start:start + spec.batch_size], spec)
            with path.open("a", encoding="utf-8") as handle:
                for text in batch:
                    handle.write(json.dumps({"answer": text}, ensure_ascii=False) + "\n")
            done += batch
    return done


def reference_metrics(answers: list[str], references: list[str]) -> dict[str, float]:
    """How close answers are to the reference answers: chrF, BLEU and ROUGE-L on MeCab words, character F1."""
    return {"chrF": metrics.chrf(answers, references), "BLEU": metrics.bleu(answers, references),
            "ROUGE-L": metrics.rouge(answers, references)["rougeL"],
            "char F1": 100 * metrics.mean_char_f1(answers, references)}


def run(sides: list[tuple[str, str]], out_dir: Path, recipe: Recipe | None, test_items: list[dict[str, Any]],
        tasks: list[str], jglue_folder: Path, limit: int | None, template: str = "auto") -> dict[str, Any]:
    """Evaluate each (label, model reference) side; write results.json and report.html into out_dir."""
    from shitate.evals.report import write_report
    from shitate.models.inference import choice_logprobs, continue_texts, load_for_inference

    unknown = [t for t in tasks if jglue.ALIASES.get(t, t) not in jglue.TASKS]
    if unknown:
        raise ShitateError(f"--tasks: unknown task(s) {', '.join(unknown)}; available: {', '.join(jglue.TASKS)} (jcqa for short)")
    references = [item["reference"] for item in test_items]
    if test_items and any(r is None for r in references):
        raise ShitateError("the test set has questions without a reference answer (a final assistant turn); "
                           "reference metrics need one for every question")
    spec = recipe.generate if recipe else GenerateSpec()
    rubric = recipe.eval.rubric if recipe else []
    out_dir.mkdir(parents=True, exist_ok=True)
    task_rows = {name: jglue.TASKS[jglue.ALIASES.get(name, name)][0](jglue_folder, limit) for name in tasks}
    results: dict[str, Any] = {"sides": [label for label, _ in sides], "metrics": {}, "rubric": {}, "answers": {}}
    for label, reference in sides:
        loaded = load_for_inference(reference, template)
        side_metrics: dict[str, float] = {}
        if test_items:
            answers = _cached_answers(out_dir / f"answers-{label}.jsonl", [i["messages"] for i in test_items], loaded, spec)
            results["answers"][label] = answers
            side_metrics.update(reference_metrics(answers, references))
            results["rubric"][label] = {c.name: sum(passes(c, a) for a in answers) for c in rubric}
        for name, rows in task_rows.items():
            with status(f"{label}: {name} ({len(rows)} examples)…"):
                result = jglue.TASKS[jglue.ALIASES.get(name, name)][1](
                    loaded, rows, logprobs=choice_logprobs,
                    generate=lambda model, prompts: continue_texts(model, prompts, spec.model_copy(update={"max_new_tokens": 24})))
            side_metrics.update({f"{result.name} {key}": value for key, value in result.metrics.items()})
        results["metrics"][label] = side_metrics
        say(f"{label}: " + ", ".join(f"{k} {v:.3f}" for k, v in side_metrics.items()))
        del loaded
    results["questions"] = [item["messages"][-1]["content"] for item in test_items]
    results["references"] = references
    results["rubric_total"] = len(test_items)
    _write_json(out_dir / "results.json", results)
    write_report(out_dir / "report.html", results)
    return results


def _write_json(path: Path, data: dict[str, Any]) -> None:
    import os

    partial = path.with_suffix(".partial")
    partial.write_text(json.dumps(data, ensure_ascii=False, indent=2), encoding="utf-8")
    os.replace(partial, path)
