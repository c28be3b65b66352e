"""Passages → question/answer pairs grounded in them, for context-grounded SFT (`data synth`).

Two ways to write the pairs:
- template: no model. An article's title becomes the question and its body the answer (第7条 試用期間 →
  「就業規則の第7条（試用期間）には何が定められていますか。」), a heading becomes 「〜について教えてください。」.
  The answers are the rules' own words, so the pipeline runs end to end on the small default model.
- model: a generator writes pairs from an editable few-shot prompt (prompts/synth_qa.txt, {passage} is replaced).
  A local model continues the prompt as plain text (few-shot works on base and instruction models alike); an
  OpenAI-compatible URL gets it as a user message. The generator is any `ask(prompts) -> texts`, built in
  workflow.synth_generator: data does not load models.

Every pair then passes the same filters, each counted in the report: empty, over-long, a "question" that is not
one (a copied passage, a statement), an answer its passage does not support, a question that gives its own answer
away, and duplicate or near-duplicate questions.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shitate.data.dedupe import duplicates, near_duplicate_backend
from shitate.data.documents import ARTICLE

PROMPT = Path(__file__).parent / "prompts" / "synth_qa.txt"
_PAIR = re.compile(r"質問\s*[:：]\s*(?P<q>.+?)\s*\n+\s*(?:回答|答え|A)\s*[:：]\s*(?P<a>.+?)"
                   r"\s*(?=\n\s*質問\s*[:：]|\n\s*\n|\n\s*文章\s*[:：]|$)",
                   re.S)


# A question ends like one (〜か。, ？, 〜てください, 〜とは) or asks with an interrogative (何と呼ぶ, どうなる):
# 97.9% of JSQuAD's 4,442 gold questions pass (the rest are bare noun phrases); a copied passage does not.
_QUESTION_END = re.compile(r"([?？]|か。?|(ください|下さい|教えて|答えよ|でしょう|言うと)。?|(とは|は)[。?？]?)$|何|なに|なん|"
                           r"どこ|誰|だれ|いつ|なぜ|どう|どの|どれ|"
                           r"いくら|いくつ|^(what|who|when|where|why|how|which)\b", re.I)


@dataclass(frozen=True)
class SynthFilters:
    """Thresholds of the filters; the defaults suit rule documents and encyclopaedia paragraphs alike."""

    min_support: float = 0.6        # share of the answer's character bigrams found in its passage (or its heading)
    max_question_chars: int = 200
    max_answer_chars: int = 1000
    duplicate_similarity: float = 0.9  # character 3-gram Jaccard; rule questions share long boilerplate


@dataclass
class SynthReport:
    passages: int = 0
    generated: int = 0
    kept: int = 0
    dropped: Counter = field(default_factory=Counter)

    def lines(self) -> list[str]:
        reasons = ", ".join(f"{reason} {count}" for reason, count in self.dropped.most_common()) or "none"
        return [f"{self.passages} passages → {self.generated} pairs generated → {self.kept} kept",
                f"dropped: {reasons}"]


# ---------------------------------------------------------------------------------------------------------------
# Template mode


def _document_name(passage: dict[str, Any]) -> str:
    path = [part for part in str(passage.get("heading", "")).split(" > ") if part]
    if len(path) > 1:
        return path[0]
    return re.sub(r"^\d+[_\-\s]*", "", Path(str(passage.get("source", ""))).stem)


def template_pairs(passage: dict[str, Any]) -> list[tuple[str, str]]:
    """Question/answer pairs from a passage's own structure: its article or heading, and its body.

    A later piece of a section too long for one answer (`part` ≥ 2, set by whole_sections) is asked for as the
    section's continuation, so that its text is not dropped as a repeat of the first piece's question.
    """
    title, _, body = passage["text"].partition("\n")
    path = [part for part in str(passage.get("heading", "")).split(" > ") if part]
    if not body.strip() or not path or path[-1] != title:
        return []  # no heading of its own: nothing to ask about without a model
    document = _document_name(passage)
    body = body.strip()
    part = int(passage.get("part", 1))
    article = ARTICLE.match(title)
    if article:
        number = article.group().replace(" ", "")
        name = title[article.end():].strip(" （()）")
        cite = f"{document}{number}" + (f"（{name}）" if name else "")
        if part > 1:
            return [(f"{cite}の続き（その{part}）を教えてください。", f"{cite}の続き（その{part}）です。\n{body}")]
        answer = f"{cite}では、次のように定めています。\n{body}"
        questions = [f"{document}の{number}" + (f"（{name}）" if name else "") + "には何が定められていますか。"]
        if name:
            questions.append(f"{document}では、{name}についてどのように定められていますか。")
        return [(question, answer) for question in questions]
    where = f"{document}の" if document and document != title else ""
    if part > 1:
        return [(f"{where}「{title}」の続き（その{part}）を教えてください。", body)]
    return [(f"{where}「{title}」について教えてください。", body)]


def whole_sections(passages: Sequence[dict[str, Any]], max_answer_chars: int) -> list[dict[str, Any]]:
    """The passages, with each section that `data import` cut by length joined back into one (without the pieces'
    overlap) as far as its template answer fits `max_answer_chars`; the pieces of a section still too long are
    numbered (`part`, from 1) and each later piece keeps only what the previous one did not say.

    Template mode asks one question of a section: left cut, its later pieces asked the first's
    question again and were dropped as duplicates, so their text was never asked about.
    """
    joined: list[dict[str, Any]] = []
    for passage in passages:
        previous = joined[-1] if joined else None
        title, _, body = passage["text"].partition("\n")
        previous_title, _, previous_body = previous["text"].partition("\n") if previous else ("", "", "")
        if previous and previous_title == title and all(previous.get(k) == passage.get(k) for k in ("source", "heading")):
            whole_body = _join_overlapping(previous_body, body)
            whole = {**previous, "text": f"{title}\n{whole_body}"}
            pairs = template_pairs(whole)  # none for a section without a heading of its own: nothing to join for
            if pairs and all(len(answer) <= max_answer_chars for _, answer in pairs):
                joined[-1] = whole
                continue
            if pairs:
                new_text = whole_body[len(previous_body):].lstrip("\n")
                passage = {**passage, "text": f"{title}\n{new_text}", "part": int(previous.get("part", 1)) + 1}
        joined.append(passage)
    return joined


def _join_overlapping(first: str, second: str) -> str:
    """Two consecutive pieces of one text, the second starting with the first's last sentences: the text."""
    for length in range(min(len(first), len(second)), 0, -1):
        whole_sentences = length == len(second) or second[length] == "\n" or second[length - 1] in "。！？!?"
        if (whole_sentences or length >= 16) and first.endswith(second[:length]):
            return first + second[length:]
    return f"{first}\n{second}"


# ---------------------------------------------------------------------------------------------------------------
# Model mode


def synth_prompt(passage_text: str, template: str | None = None) -> str:
    template = template if template is not None else PROMPT.read_text(encoding="utf-8")
    return template.replace("{passage}", passage_text.strip())


def parse_pairs(output: str) -> list[tuple[str, str]]:
    """Every 質問:/回答: pair in a generator's output; the prompt ends with 「質問:」, so a continuation starts inside one."""
    if not re.match(r"\s*質問\s*[:：]", output):
        output = "質問:" + output
    return [(m.group("q").strip(), m.group("a").strip()) for m in _PAIR.finditer(output)]


def model_pairs(ask: Callable[[list[str]], list[str]], passages: Sequence[dict[str, Any]], per_passage: int = 3,
                template: str | None = None, on_batch: Callable[[int], None] | None = None,
                batch_size: int = 8) -> list[list[tuple[str, str]]]:
    """The pairs a generator writes for each passage (at most per_passage each)."""
    found: list[list[tuple[str, str]]] = []
    for start in range(0, len(passages), batch_size):
        chunk = passages[start:start + batch_size]
        outputs = ask([synth_prompt(p["text"], template) for p in chunk])
        found += [parse_pairs(output)[:per_passage] for output in outputs]
        if on_batch is not None:
            on_batch(len(chunk))
    return found


def until_next_passage(text: str) -> str:
    """A continuation cut where a base model starts inventing the next few-shot passage."""
    return re.split(r"\n\s*文章\s*[:：]", text, maxsplit=1)[0]


# ---------------------------------------------------------------------------------------------------------------
# Filters


def _bigrams(text: str) -> list[str]:
    compact = re.sub(r"\s+", "", text)
    return [compact[i:i + 2] for i in range(len(compact) - 1)] or ([compact] if compact else [])


def support(answer: str, passage: str) -> float:
    """Share of the answer's character bigrams that occur in the passage: 1.0 for a quotation, near 0 for an invention."""
    grams = _bigrams(answer)
    if not grams:
        return 0.0
    present = set(_bigrams(passage))
    return sum(1 for g in grams if g in present) / len(grams)


def _compact(text: str) -> str:
    return re.sub(r"[\s。、．，.,！？!?「」]", "", text)


def repeats_itself(answer: str, passage: str, width: int = 8, times: int = 3) -> bool:
    """True where a phrase comes back in the answer at least `times` times and more often than in its passage: the
    loop a small generator falls into (「…の作成者と…の作成者の間で、…の作成者と…」), which the support filter passes
    because every piece of it is quoted. Rule lists that repeat a phrase as often as their source are kept."""
    def counts(text: str) -> Counter:
        compact = _compact(text)
        return Counter(compact[i:i + width] for i in range(len(compact) - width + 1))
    in_passage = counts(passage)
    return any(count >= times and count > in_passage[gram] for gram, count in counts(answer).items())


def filter_pairs(candidates: Sequence[tuple[dict[str, Any], str, str]], filters: SynthFilters,
                 report: SynthReport) -> list[dict[str, Any]]:
    """Chat records with the passage as context, for the (passage, question, answer) candidates that pass."""
    passing: list[tuple[dict[str, Any], str, str]] = []
    for passage, question, answer in candidates:
        reason = None
        if not question.strip() or not answer.strip():
            reason = "empty"
        elif len(question) > filters.max_question_chars or len(answer) > filters.max_answer_chars:
            reason = "over-long"
        elif "\n" in question.strip() or not _QUESTION_END.search(question.strip()):
            reason = "not a question"
        elif support(answer, source := f"{passage.get('heading', '')}\n{passage['text']}") < filters.min_support:
            reason = "answer not in passage"
        elif repeats_itself(answer, source):
            reason = "answer repeats itself"
        elif len(compact := _compact(answer)) >= 2 and compact in _compact(question):
            reason = "question contains answer"
        if reason:
            report.dropped[reason] += 1
        else:
            passing.append((passage, question, answer))
    # Near-duplicates are looked for within one document: 「就業規則の第1条（目的）…」 and 「賃金規程の第1条（目的）…」
    # differ by two characters and are different questions.
    by_document: dict[str, list[int]] = {}
    for index, (passage, _, _) in enumerate(passing):
        by_document.setdefault(str(passage.get("source", "")), []).append(index)
    repeated = set()
    for indices in by_document.values():
        matches = duplicates([passing[i][1] for i in indices], filters.duplicate_similarity)
        repeated |= {indices[m.index] for m in matches}
    if repeated:
        report.dropped["duplicate question"] = len(repeated)
    records = []
    for index, (passage, question, answer) in enumerate(passing):
        if index in repeated:
            continue
        record = {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}],
                  "context": passage["text"]}
        record.update({key: passage[key] for key in ("source", "heading") if passage.get(key)})
        records.append(record)
    report.kept = len(records)
    return records


def synthesize(passages: Sequence[dict[str, Any]], mode: str = "template",
               ask: Callable[[list[str]], list[str]] | None = None, per_passage: int = 3,
               template: str | None = None, filters: SynthFilters | None = None,
               on_batch: Callable[[int], None] | None = None) -> tuple[list[dict[str, Any]], SynthReport]:
    """QA chat records (with `context`) for the passages, and what was kept and dropped."""
    report = SynthReport(passages=len(passages))
    filters = filters or SynthFilters()
    near_duplicate_backend()  # the last filter's: before any model generates
    if mode == "template":
        if on_batch is not None:
            on_batch(len(passages))  # every passage read, joined or not
        passages = whole_sections(passages, filters.max_answer_chars)
        generated = [template_pairs(p) for p in passages]
    else:
        assert ask is not None, "model mode needs a generator"
        generated = model_pairs(ask, passages, per_passage, template, on_batch)
    candidates = [(passage, q, a) for passage, pairs in zip(passages, generated) for q, a in pairs]
    report.generated = len(candidates)
    if empty := sum(1 for pairs in generated if not pairs):
        report.dropped["passage gave no pair"] = empty
    return filter_pairs(candidates, filters, report), report

