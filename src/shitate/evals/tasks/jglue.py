"""Japanese tasks: JGLUE v1.3 (yahoojapan/JGLUE), translation and summarisation; loaders, prompts, scoring.

Multiple choice (JCommonsenseQA), NLI (JNLI) and similarity (JSTS) are scored by the
log-likelihood of each answer after the prompt, as lm-eval does; JSQuAD, translation
(small-parallel-enja, English → Japanese) and summarisation (Dolly-ja) by generation.
The JGLUE files are read from ../shared/data/jglue/ or a folder given with --jglue; the
other two data sets from its sibling folders.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shitate.errors import ShitateError
from shitate.evals import metrics

NLI_LABELS = {"entailment": "含意", "contradiction": "矛盾", "neutral": "中立"}


def _jsonl(path: Path, limit: int | None) -> list[dict[str, Any]]:
    if not path.is_file():
        raise ShitateError(f"{path}: JGLUE file not found. Point --jglue at the folder with the JGLUE JSON files.")
    rows = []
    with path.open(encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                rows.append(json.loads(line))
                if limit and len(rows) >= limit:
                    break
    return rows


def load_jcommonsenseqa(folder: Path, limit: int | None = None) -> list[dict[str, Any]]:
    return [{"question": r["question"], "choices": [r[f"choice{i}"] for i in range(5)], "label": r["label"]}
            for r in _jsonl(folder / "jcommonsenseqa-valid.json", limit)]


def load_jnli(folder: Path, limit: int | None = None) -> list[dict[str, Any]]:
    return [{"premise": r["sentence1"], "hypothesis": r["sentence2"], "label": r["label"]}
            for r in _jsonl(folder / "jnli-valid.json", limit)]


def load_jsts(folder: Path, limit: int | None = None) -> list[dict[str, Any]]:
    return [{"sentence1": r["sentence1"], "sentence2": r["sentence2"], "score": float(r["label"])}
            for r in _jsonl(folder / "jsts-valid.json", limit)]


def load_jsquad(folder: Path, limit: int | None = None) -> list[dict[str, Any]]:
    path = folder / "jsquad-valid.json"
    if not path.is_file():
        raise ShitateError(f"{path}: JGLUE file not found. Point --jglue at the folder with the JGLUE JSON files.")
    rows = []
    for article in json.loads(path.read_text(encoding="utf-8"))["data"]:
        for paragraph in article["paragraphs"]:
            for qa in paragraph["qas"]:
                rows.append({"context": paragraph["context"], "question": qa["question"],
                             "answers": sorted({a["text"] for a in qa["answers"]})})
                if limit and len(rows) >= limit:
                    return rows
    return rows


@dataclass(frozen=True)
class TaskResult:
    """A task's metrics and its per-example predictions."""

    name: str
    metrics: dict[str, float]
    predictions: list[Any]


def run_jcommonsenseqa(loaded: Any, rows: list[dict[str, Any]], logprobs: Callable, **_: Any) -> TaskResult:
    scores = logprobs(loaded, [f"質問: {r['question']}\n答え:" for r in rows], [r["choices"] for r in rows])
    predicted = [max(range(len(s)), key=s.__getitem__) for s in scores]
    return TaskResult("jcommonsenseqa", {"accuracy": metrics.accuracy(predicted, [r["label"] for r in rows])}, predicted)


def run_jnli(loaded: Any, rows: list[dict[str, Any]], logprobs: Callable, **_: Any) -> TaskResult:
    labels = list(NLI_LABELS)
    prompts = [f"前提: {r['premise']}\n仮説: {r['hypothesis']}\n前提と仮説の関係は含意・矛盾・中立のどれ?\n答え:" for r in rows]
    scores = logprobs(loaded, prompts, [[NLI_LABELS[label] for label in labels]] * len(rows))
    predicted = [labels[max(range(3), key=s.__getitem__)] for s in scores]
    references = [r["label"] for r in rows]
    return TaskResult("jnli", {"accuracy": metrics.accuracy(predicted, references),
                               **metrics.precision_recall_f1(predicted, references)}, predicted)


def run_jsts(loaded: Any, rows: list[dict[str, Any]], logprobs: Callable, **_: Any) -> TaskResult:
    import math

    prompts = [f"文1: {r['sentence1']}\n文2: {r['sentence2']}\n二つの文の意味の近さを0から5で答えてください。\n答え:"
               for r in rows]
    scores = logprobs(loaded, prompts, [[str(k) for k in range(6)]] * len(rows))
    predicted = []
    for s in scores:  # the expected score under the model's distribution over 0…5
        weights = [math.exp(v - max(s)) for v in s]
        predicted.append(sum(k * w for k, w in enumerate(weights)) / sum(weights))
    gold = [r["score"] for r in rows]
    return TaskResult("jsts", {"pearson": metrics.pearson(predicted, gold), "spearman": metrics.spearman(predicted, gold)},
                      predicted)


def run_jsquad(loaded: Any, rows: list[dict[str, Any]], generate: Callable, **_: Any) -> TaskResult:
    prompts = [f"{r['context']}\n質問: {r['question']}\n答え:" for r in rows]
    answers = [text.split("\n")[0].strip() for text in generate(loaded, prompts)]
    references = [r["answers"] for r in rows]
    return TaskResult("jsquad", {"exact_match": metrics.exact_match(answers, references),
                                 "char_f1": metrics.mean_char_f1(answers, references)}, answers)


def load_translation(folder: Path, limit: int | None = None) -> list[dict[str, Any]]:
    """small-parallel-enja dev: English → Japanese; the Japanese side is pre-tokenised, so its spaces are removed."""
    base = folder.parent / "small-parallel-enja"
    english, japanese = base / "dev.en", base / "dev.ja"
    if not english.is_file() or not japanese.is_file():
        raise ShitateError(f"{base}: small-parallel-enja not found beside the JGLUE folder.")
    pairs = zip(english.read_text(encoding="utf-8").splitlines(), japanese.read_text(encoding="utf-8").splitlines())
    rows = [{"english": en.strip(), "japanese": ja.replace(" ", "").strip()} for en, ja in pairs]
    return rows[:limit] if limit else rows


def load_summarization(folder: Path, limit: int | None = None) -> list[dict[str, Any]]:
    """Dolly-ja's summarization records: a passage, an instruction, a reference summary."""
    path = folder.parent / "dolly-ja" / "databricks-dolly-15k-ja.jsonl"
    if not path.is_file():
        raise ShitateError(f"{path}: dolly-ja not found beside the JGLUE folder.")
    rows = []
    with path.open(encoding="utf-8") as handle:
        for line in handle:
            record = json.loads(line)
            if record.get("category") == "summarization" and record.get("input") and record.get("output"):
                rows.append({"instruction": record["instruction"], "passage": record["input"], "summary": record["output"]})
                if limit and len(rows) >= limit:
                    break
    return rows


def run_translation(loaded: Any, rows: list[dict[str, Any]], generate: Callable, **_: Any) -> TaskResult:
    prompts = [f"次の英文を日本語に翻訳してください。\n英文: {r['english']}\n日本語:" for r in rows]
    answers = [text.split("\n")[0].strip() for text in generate(loaded, prompts, 64)]
    references = [r["japanese"] for r in rows]
    return TaskResult("translation", {"BLEU": metrics.bleu(answers, references), "chrF": metrics.chrf(answers, references)},
                      answers)


def run_summarization(loaded: Any, rows: list[dict[str, Any]], generate: Callable, **_: Any) -> TaskResult:
    prompts = [f"{r['passage']}\n\n指示: {r['instruction']}\n要約:" for r in rows]
    answers = [text.strip() for text in generate(loaded, prompts, 160)]
    scores = metrics.rouge(answers, [r["summary"] for r in rows])
    return TaskResult("summarization", {"ROUGE-1": scores["rouge1"], "ROUGE-2": scores["rouge2"], "ROUGE-L": scores["rougeL"]},
                      answers)


# Tasks scored by Japanese word counts (BLEU, ROUGE), which need MeCab: checked before any model answers.
WORD_METRIC_TASKS = {"translation", "summarization"}
TASKS: dict[str, tuple[Callable[..., list[dict[str, Any]]], Callable[..., TaskResult]]] = {
    "jcommonsenseqa": (load_jcommonsenseqa, run_jcommonsenseqa),
    "jnli": (load_jnli, run_jnli),
    "jsts": (load_jsts, run_jsts),
    "jsquad": (load_jsquad, run_jsquad),
    "translation": (load_translation, run_translation),
    "summarization": (load_summarization, run_summarization),
}
ALIASES = {"jcqa": "jcommonsenseqa"}
