"""`shitate eval`: the same questions and tasks for each model, then one report.

For a run folder, the two sides are its base model and the tuned run, asked the recipe's
test questions with the recipe's generation settings and scored by its rubric and by
reference metrics; `--tasks` adds JGLUE; preference pairs (`--pairs`, or a preference stage's
data.test) add preference accuracy. Answers are cached per side as they are produced,
so an interrupted evaluation resumes where it stopped.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast, get_args

from shitate.config import GenerateSpec, Recipe
from shitate.errors import ShitateError
from shitate.evals import metrics
from shitate.evals.judge import Mode
from shitate.evals.rubric import passes
from shitate.evals.tasks import jglue
from shitate.progress import say, status, work_bar


def _cached_answers(path: Path, conversations: list[list[dict[str, str]]], loaded: Any, spec: GenerateSpec) -> list[str]:
    """Answers for each conversation, reusing what an earlier (interrupted) evaluation saved."""
    from shitate.models.inference import answer

    done = _saved_answers(path)
    with work_bar() as bar:
        task = bar.add_task("answering", total=len(conversations), completed=len(done))
        for start in range(len(done), len(conversations), spec.batch_size):
            batch = answer(loaded, conversations[start:start + spec.batch_size], spec)
            with path.open("a", encoding="utf-8") as handle:
                for text in batch:
                    handle.write(json.dumps({"answer": text}, ensure_ascii=False) + "\n")
            done += batch
            bar.advance(task, len(batch))
    return done


def _saved_answers(path: Path) -> list[str]:
    """The answers a cache holds, up to the first line a killed evaluation left half written (that line and any
    after it are dropped from the file, so new answers append after whole lines)."""
    from shitate.data.formats import write_lines

    if not path.is_file():
        return []
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    answers = []
    for line in lines:
        try:
            answers.append(json.loads(line)["answer"])
        except (json.JSONDecodeError, KeyError, TypeError):
            break
    if len(answers) < len(lines):
        write_lines(path, lines[:len(answers)])
    return answers


def answers_check(recipe: Recipe) -> Any:
    """For evaluation during training: a function that answers the first validation (or test) questions
    with a model and returns rubric pass rates and chrF."""
    from shitate.data.formats import read_questions
    from shitate.models.inference import answer

    questions_file = recipe.data.validation or recipe.data.test
    if questions_file is None:
        raise ShitateError("eval.every_steps needs data.validation or data.test to draw questions from")
    items = read_questions(questions_file, recipe.data.system)[: recipe.eval.examples]
    references = [item["reference"] for item in items]
    if all(references):
        metrics.require_packages(words=False)  # before training starts, not at its first check

    def check(loaded: Any) -> dict[str, float]:
        answers = answer(loaded, [item["messages"] for item in items], recipe.generate)
        scores = {f"eval_rubric/{c.name}": sum(passes(c, a) for a in answers) / len(answers) for c in recipe.eval.rubric}
        if all(references):
            scores["eval_chrF"] = metrics.chrf(answers, references)
        return scores

    return check


def reference_metrics(answers: list[str], references: list[str]) -> dict[str, float]:
    """How close answers are to the reference answers: chrF, BLEU and ROUGE-L on MeCab words, character F1, and
    where references cite articles (第N条), the share of answers citing the same ones."""
    scores = {"chrF": metrics.chrf(answers, references), "BLEU": metrics.bleu(answers, references),
              "ROUGE-L": metrics.rouge(answers, references)["rougeL"],
              "char F1": 100 * metrics.mean_char_f1(answers, references)}
    cites = metrics.cites_same_articles(answers, references)
    if cites is not None:  # answers about rules: does the answer name the article the reference names?
        scores["cites the article %"] = 100 * cites
    return scores


def general_questions(path: Path, count: int) -> list[str]:
    """Everyday prompts for the general-ability check: the first turn of each chat-bench question."""
    if not path.is_file():
        raise ShitateError(f"{path}: chat benchmark not found; give --chat-bench FILE (JSONL with \"turns\" or \"prompt\").")
    questions = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            record = json.loads(line)
            questions.append(record["turns"][0] if "turns" in record else record["prompt"])
        if len(questions) >= count:
            break
    return questions


def _judge_results(asks: dict[str, Any], mode: Mode, prompt_files: list[Path], labels: list[str],
                   questions: list[str], answers: dict[str, list[str]], references: list[str | None]) -> dict[str, Any]:
    """Every judge with every prompt on every side (score/likert) or on the pair (pairwise), combined as an ensemble."""
    from shitate.evals import judge as judging

    templates = {str(f): judging.load_prompt(mode, f) for f in prompt_files} or {"built-in": judging.load_prompt(mode)}
    # Each (judge, prompt) pair is one member of the ensemble.
    judges = {(name if len(templates) == 1 else f"{name} / {prompt}"): (ask, template)
              for name, ask in asks.items() for prompt, template in templates.items()}
    report: dict[str, Any] = {"mode": mode, "judges": list(judges)}
    if mode == "pairwise":
        runs = {name: judging.pairwise(ask, template, questions, answers[labels[0]], answers[labels[1]])
                for name, (ask, template) in judges.items()}
        ensemble = judging.Ensemble("pairwise", [r["outcomes"] for r in runs.values()])
        combined = ensemble.combined()
        report["per_judge"] = {name: {k: v for k, v in r.items() if k != "outcomes"} for name, r in runs.items()}
        report["combined"] = {labels[0]: combined.count("first"), labels[1]: combined.count("second"),
                              "tie": combined.count("tie"), "unparseable": combined.count(None)}
    else:
        report["per_judge"], report["combined"], agreements = {}, {}, []
        for label in labels:
            verdicts = {name: judging.judge(ask, mode, judging.pointwise_prompts(template, questions, answers[label], references))
                        for name, (ask, template) in judges.items()}
            ensemble = judging.Ensemble(mode, [v.values for v in verdicts.values()])
            known = [v for v in ensemble.combined() if v is not None]
            report["per_judge"][label] = {name: {"mean": _mean(v.values), "unparseable": v.unparseable, "retried": v.retried}
                                          for name, v in verdicts.items()}
            report["combined"][label] = {"mean": sum(known) / len(known) if known else None,
                                         "unparseable": len(questions) - len(known)}
            agreements.append(ensemble.agreement())
    if len(judges) > 1:
        report["agreement"] = ensemble.agreement() if mode == "pairwise" else sum(agreements) / len(agreements)
    return report


def _mean(values: list[Any]) -> float | None:
    known = [v for v in values if v is not None]
    return sum(known) / len(known) if known else None


def run(sides: list[tuple[str, str]], out_dir: Path, recipe: Recipe | None, test_items: list[dict[str, Any]],
        tasks: Sequence[str], jglue_folder: Path, limit: int | None, template: str = "auto", judges: Sequence[str] = (),
        judge_mode: str = "pairwise", judge_prompts: Sequence[Path] = (), general: Sequence[str] = (),
        pairs: Sequence[dict[str, Any]] = ()) -> dict[str, Any]:
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
    if test_items or jglue.WORD_METRIC_TASKS & set(tasks):  # BLEU/ROUGE: before any model loads or answers
        metrics.require_packages(words=True)
    if judge_mode not in get_args(Mode):
        raise ShitateError(f"--judge-mode {judge_mode!r}: expected one of {', '.join(get_args(Mode))}")
    mode = cast(Mode, judge_mode)
    if judge_mode == "pairwise" and judges and len(sides) != 2:
        raise ShitateError("--judge-mode pairwise compares two models: evaluate a run folder (base vs tuned), "
                           "or use --judge-mode score or likert for one model")
    if general and (len(sides) != 2 or not judges):
        raise ShitateError("--general needs a run folder (base vs tuned) and at least one --judge")
    # Judges are reached before any model answers, so an unreachable endpoint fails in seconds.
    from shitate.evals.judge import make_judge

    asks = {f"judge {i + 1}: {name}": make_judge(name) for i, name in enumerate(judges)}
    spec = recipe.generate if recipe else GenerateSpec()
    rubric = recipe.eval.rubric if recipe else []
    out_dir.mkdir(parents=True, exist_ok=True)
    task_rows = {name: jglue.TASKS[jglue.ALIASES.get(name, name)][0](jglue_folder, limit) for name in tasks}
    results: dict[str, Any] = {"sides": [label for label, _ in sides], "metrics": {}, "rubric": {}, "answers": {}}
    for label, reference in sides:
        loaded = load_for_inference(reference, template)
        side_metrics: dict[str, float] = {}
        if test_items:
            conversations = [i["messages"] for i in test_items]
            answers = _cached_answers(out_dir / f"answers-{label}-{_key(reference, spec, conversations)}.jsonl",
                                      conversations, loaded, spec)
            results["answers"][label] = answers
            side_metrics.update(reference_metrics(answers, references))
            results["rubric"][label] = {c.name: sum(passes(c, a) for a in answers) for c in rubric}
        if general:
            everyday = [[{"role": "user", "content": q}] for q in general]
            results.setdefault("general_answers", {})[label] = _cached_answers(
                out_dir / f"general-{label}-{_key(reference, spec, everyday)}.jsonl", everyday, loaded, spec)
        if pairs:
            from shitate.evals.preference import answer_logps, preference_metrics

            scores = answer_logps(loaded, list(pairs), recipe.data.system if recipe else None,
                                  recipe.train.max_length if recipe else 1024)
            results.setdefault("pair_scores", {})[label] = scores
            start = results["pair_scores"][sides[0][0]] if label != sides[0][0] else None
            side_metrics.update(preference_metrics(scores, start))
        for name, rows in task_rows.items():
            with status(f"{label}: {name} ({len(rows)} examples)…"):
                result = jglue.TASKS[jglue.ALIASES.get(name, name)][1](
                    loaded, rows, logprobs=choice_logprobs,
                    generate=lambda model, prompts, length=24: continue_texts(
                        model, prompts, spec.model_copy(update={"max_new_tokens": length})))
            side_metrics.update({f"{result.name} {key}": value for key, value in result.metrics.items()})
        results["metrics"][label] = side_metrics
        say(f"{label}: " + ", ".join(f"{k} {v:.3f}" for k, v in side_metrics.items()))
        del loaded
    results["questions"] = [item["messages"][-1]["content"] for item in test_items]
    results["references"] = references
    labels = [label for label, _ in sides]
    if asks and test_items:
        with status(f"judging {len(test_items)} answers with {len(asks)} judge(s)…"):
            results["judge"] = _judge_results(asks, mode, list(judge_prompts), labels, results["questions"],
                                              results["answers"], references)
    if general:
        with status(f"general-ability check: {len(general)} everyday prompts, judged pairwise…"):
            results["general"] = _judge_results(asks, "pairwise", [], labels, list(general), results["general_answers"],
                                                [None] * len(general))
            results["general"]["questions"] = list(general)
    results["rubric_total"] = len(test_items)
    _write_json(out_dir / "results.json", results)
    write_report(out_dir / "report.html", results)
    return results


def _key(reference: str, spec: GenerateSpec, conversations: list[Any]) -> str:
    """A short digest naming a cache of answers: other settings or questions get a fresh cache."""
    import hashlib

    text = json.dumps([reference, spec.model_dump(), conversations], ensure_ascii=False, sort_keys=True)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:12]


def _write_json(path: Path, data: dict[str, Any]) -> None:
    import os

    partial = path.with_suffix(".partial")
    partial.write_text(json.dumps(data, ensure_ascii=False, indent=2), encoding="utf-8")
    os.replace(partial, path)
