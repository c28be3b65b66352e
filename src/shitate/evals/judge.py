"""LLM-as-judge: score (0–100), Likert (0/1/2), pairwise (asked in both orders) and ensembles.

A judge is any model shitate can load locally, or an OpenAI-compatible endpoint named by its
URL (a local llama.cpp or vLLM server); nothing is sent anywhere unless the user gives the URL.
Prompts are Japanese text files (evals/prompts/) that a user can copy and edit. Output that
cannot be parsed is asked again, then counted and reported, never silently dropped.
"""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from shitate.config import GenerateSpec
from shitate.errors import ShitateError

Mode = Literal["score", "likert", "pairwise"]
PROMPTS = Path(__file__).parent / "prompts"
RETRY_NOTE = "\n\n(前の回答は形式に従っていませんでした。最後の行を指定の形式で必ず書いてください。)"


@dataclass
class Verdicts:
    """One judge's parsed verdicts (None where the output never parsed) and the raw outputs."""

    values: list[Any]
    raw: list[str]
    unparseable: int = 0
    retried: int = 0


def parse(mode: Mode, text: str) -> Any:
    """The verdict in a judge's output: an int for score/likert, 'A'/'B'/'tie' for pairwise; None if absent."""
    if mode == "pairwise":
        found = re.findall(r"勝者\s*[:：]\s*(A|B|Ａ|Ｂ|引き分け)", text)
        return None if not found else {"A": "A", "Ａ": "A", "B": "B", "Ｂ": "B"}.get(found[-1], "tie")
    found = re.findall(r"評価\s*[:：]\s*(\d{1,3})", text)
    if not found:
        return None
    value = int(found[-1])
    top = 100 if mode == "score" else 2
    return value if 0 <= value <= top else None


def endpoint_judge(url: str, model_name: str | None = None, timeout: float = 120.0) -> Callable[[list[str]], list[str]]:
    """Ask an OpenAI-compatible /chat/completions endpoint; fail up front if it cannot be reached.

    `URL#NAME` picks a served model; without a name the server's only model is used (or one named `judge`).
    The key, where the server wants one, comes from SHITATE_JUDGE_API_KEY.
    """
    import os

    url, _, named = url.partition("#")
    base = url.rstrip("/")
    if not base.endswith("/v1"):
        base += "/v1"
    headers = {"Content-Type": "application/json"}
    if os.environ.get("SHITATE_JUDGE_API_KEY"):
        headers["Authorization"] = f"Bearer {os.environ['SHITATE_JUDGE_API_KEY']}"

    def call(path: str, body: dict[str, Any] | None = None) -> Any:
        request = urllib.request.Request(f"{base}{path}", headers=headers,
                                         data=None if body is None else json.dumps(body).encode("utf-8"))
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return json.loads(response.read().decode("utf-8"))
        except urllib.error.HTTPError as err:
            if err.code == 401:
                raise ShitateError(f"judge endpoint {url} refused the API key: set SHITATE_JUDGE_API_KEY to the "
                                   "key the server was started with.") from None
            raise
        except (urllib.error.URLError, OSError) as err:
            raise ShitateError(f"judge endpoint {url} could not be reached ({err}). Start the server "
                               "(shitate serve, or llama.cpp's llama-server) or give a local model as the judge.") from None

    name = model_name or named
    if not name:
        try:
            served = [m["id"] for m in call("/models")["data"]]
        except (urllib.error.HTTPError, KeyError, TypeError, ValueError):
            served = []  # a server without /models: it answers whatever name it is sent
        name = served[0] if len(served) == 1 else "judge"
        if len(served) > 1 and "judge" not in served:
            raise ShitateError(f"judge endpoint {url} serves {', '.join(served)}: name the judge, e.g. "
                               f"--judge {url}#{served[0]}")

    def ask_one(prompt: str) -> str:
        try:
            reply = call("/chat/completions", {"model": name, "temperature": 0,
                                               "messages": [{"role": "user", "content": prompt}]})
            return reply["choices"][0]["message"]["content"]
        except (urllib.error.HTTPError, KeyError, IndexError, TypeError, ValueError):
            return ""  # not an OpenAI-style answer: counted as unparseable, then retried

    def ask(prompts: list[str]) -> list[str]:
        return [ask_one(p) for p in prompts]

    ask([""])  # reach it once before any work is done
    return ask


def local_judge(reference: str, spec: GenerateSpec | None = None) -> Callable[[list[str]], list[str]]:
    """A model shitate loads itself, asked with its chat template."""
    from shitate.models.inference import answer, load_for_inference

    loaded = load_for_inference(reference)
    spec = spec or GenerateSpec(max_new_tokens=256, batch_size=4)
    return lambda prompts: answer(loaded, [[{"role": "user", "content": p}] for p in prompts], spec)


def make_judge(reference: str) -> Callable[[list[str]], list[str]]:
    """A judge from a URL (http…) or a model reference."""
    if reference.startswith(("http://", "https://")):
        return endpoint_judge(reference)
    return local_judge(reference)


def load_prompt(mode: Mode, path: Path | None = None) -> str:
    template = (path or PROMPTS / f"{mode}.txt").read_text(encoding="utf-8")
    needed = ["{answer_a}", "{answer_b}"] if mode == "pairwise" else ["{answer}"]
    missing = [n for n in ["{question}", *needed] if n not in template]
    if missing:
        raise ShitateError(f"{path}: a {mode} judge prompt needs the placeholders {', '.join(missing)}")
    return template


def judge(ask: Callable[[list[str]], list[str]], mode: Mode, prompts: list[str], retries: int = 2) -> Verdicts:
    """Ask every prompt; ask again (with a reminder of the format) where the answer did not parse."""
    raw = ask(prompts)
    values = [parse(mode, text) for text in raw]
    verdicts = Verdicts(values, raw)
    for _ in range(retries):
        todo = [i for i, v in enumerate(values) if v is None]
        if not todo:
            break
        verdicts.retried += len(todo)
        for i, text in zip(todo, ask([prompts[i] + RETRY_NOTE for i in todo])):
            values[i], raw[i] = parse(mode, text), text
    verdicts.unparseable = sum(v is None for v in values)
    return verdicts


def pointwise_prompts(template: str, questions: list[str], answers: list[str], references: list[str | None]) -> list[str]:
    return [template.format(question=q, answer=a, reference=r or "(なし)") for q, a, r in zip(questions, answers, references)]


def pairwise(ask: Callable[[list[str]], list[str]], template: str, questions: list[str], first: list[str],
             second: list[str], retries: int = 2) -> dict[str, Any]:
    """Compare two answer lists, asking each question in both orders; a split decision counts as a tie."""
    forward = judge(ask, "pairwise", [template.format(question=q, answer_a=a, answer_b=b)
                                      for q, a, b in zip(questions, first, second)], retries)
    backward = judge(ask, "pairwise", [template.format(question=q, answer_a=b, answer_b=a)
                                       for q, a, b in zip(questions, first, second)], retries)
    outcomes: list[str | None] = []
    for one, two in zip(forward.values, backward.values):
        if one is None or two is None:
            outcomes.append(None)
            continue
        one_says = {"A": "first", "B": "second"}.get(one, "tie")
        two_says = {"A": "second", "B": "first"}.get(two, "tie")
        outcomes.append(one_says if one_says == two_says else "tie")
    consistent = sum(1 for one, two in zip(forward.values, backward.values) if one and two and
                     {"A": "first", "B": "second"}.get(one, "tie") == {"A": "second", "B": "first"}.get(two, "tie"))
    return {"first": outcomes.count("first"), "second": outcomes.count("second"), "tie": outcomes.count("tie"),
            "unparseable": outcomes.count(None), "consistent_in_both_orders": consistent, "outcomes": outcomes,
            "retried": forward.retried + backward.retried}


@dataclass
class Ensemble:
    """Several judges' verdicts on the same items, combined by mean (scores) or majority vote."""

    mode: Mode
    verdicts: list[list[Any]] = field(default_factory=list)

    def combined(self) -> list[Any]:
        out: list[Any] = []
        for item in zip(*self.verdicts):
            known = [v for v in item if v is not None]
            if not known:
                out.append(None)
            elif self.mode == "score":
                out.append(sum(known) / len(known))
            else:
                counts = {v: known.count(v) for v in known}
                best = max(counts.values())
                winners = [v for v, c in counts.items() if c == best]
                disagreed = "tie" if self.mode == "pairwise" else round(sum(known) / len(known))
                out.append(winners[0] if len(winners) == 1 else disagreed)
        return out

    def agreement(self) -> float:
        """Share of items where every judge that answered gave the same verdict (scores: within 10 points)."""
        items = [[v for v in item if v is not None] for item in zip(*self.verdicts)]
        items = [i for i in items if len(i) > 1]
        if not items:
            return float("nan")
        if self.mode == "score":
            return sum(max(i) - min(i) <= 10 for i in items) / len(items)
        return sum(len(set(i)) == 1 for i in items) / len(items)
