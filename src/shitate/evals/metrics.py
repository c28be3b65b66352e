"""Task metrics, each checked against a hand-computed example in tests/unit/test_metrics.py.

Japanese has no spaces, so every metric that counts words tokenises with MeCab (sacrebleu's
`ja-mecab`, from the `eval` extra) or counts characters; nothing here splits on spaces.
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections import Counter
from collections.abc import Sequence


def accuracy(predictions: Sequence[object], references: Sequence[object]) -> float:
    """Share of exact matches."""
    _same_length(predictions, references)
    return sum(p == r for p, r in zip(predictions, references)) / len(references)


def precision_recall_f1(predictions: Sequence[object], references: Sequence[object]) -> dict[str, float]:
    """Macro-averaged precision, recall and F1 over the labels that occur in either list."""
    _same_length(predictions, references)
    labels = sorted(set(references) | set(predictions), key=str)
    precisions, recalls, f1s = [], [], []
    for label in labels:
        true_positive = sum(p == label and r == label for p, r in zip(predictions, references))
        predicted = sum(p == label for p in predictions)
        actual = sum(r == label for r in references)
        precision = true_positive / predicted if predicted else 0.0
        recall = true_positive / actual if actual else 0.0
        precisions.append(precision)
        recalls.append(recall)
        f1s.append(2 * precision * recall / (precision + recall) if precision + recall else 0.0)
    return {"precision": sum(precisions) / len(labels), "recall": sum(recalls) / len(labels),
            "macro_f1": sum(f1s) / len(labels)}


def pearson(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Pearson correlation; 0 when either side is constant."""
    _same_length(xs, ys)
    mean_x, mean_y = sum(xs) / len(xs), sum(ys) / len(ys)
    covariance = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys))
    spread = math.sqrt(sum((x - mean_x) ** 2 for x in xs) * sum((y - mean_y) ** 2 for y in ys))
    return covariance / spread if spread else 0.0


def _ranks(values: Sequence[float]) -> list[float]:
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):  # ties share the mean of their ranks
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def spearman(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Spearman rank correlation (Pearson on ranks, ties averaged)."""
    return pearson(_ranks(xs), _ranks(ys))


def normalize_answer(text: str) -> str:
    """NFKC, no surrounding space or sentence-final punctuation: the form answers are compared in."""
    return unicodedata.normalize("NFKC", text).strip().rstrip("。.!！?？").strip()


def exact_match(predictions: Sequence[str], references: Sequence[str | Sequence[str]]) -> float:
    """Share of answers equal to a reference after normalisation (any of several references)."""
    _same_length(predictions, references)
    hits = 0
    for prediction, reference in zip(predictions, references):
        options = [reference] if isinstance(reference, str) else list(reference)
        hits += any(normalize_answer(prediction) == normalize_answer(o) for o in options)
    return hits / len(references)


def char_f1(prediction: str, reference: str) -> float:
    """F1 over characters (as JGLUE scores JSQuAD), after normalisation."""
    predicted, actual = Counter(normalize_answer(prediction)), Counter(normalize_answer(reference))
    common = sum((predicted & actual).values())
    if not common:
        return 0.0
    precision, recall = common / sum(predicted.values()), common / sum(actual.values())
    return 2 * precision * recall / (precision + recall)


def mean_char_f1(predictions: Sequence[str], references: Sequence[str | Sequence[str]]) -> float:
    """Mean character F1, taking the best reference where there are several."""
    _same_length(predictions, references)
    scores = [max(char_f1(p, o) for o in ([r] if isinstance(r, str) else r)) for p, r in zip(predictions, references)]
    return sum(scores) / len(scores)


# A rules' name is kanji and katakana (就業規則, 出張旅費規程, 労基法): hiragana ends it (「就業規則では第7条」).
_CITATION = re.compile(r"([一-龥ァ-ヶー々・A-Za-z0-9]{1,30}?(?:規則|規程|法))?\s*第\s*([0-9]+)\s*条")


def citations(text: str) -> set[str]:
    """The articles a text cites, as 第N条 (with the rules' name where one is written right before it)."""
    return {f"{name or ''}第{number}条" for name, number in _CITATION.findall(unicodedata.normalize("NFKC", text))}


def cites_same_articles(predictions: Sequence[str], references: Sequence[str]) -> float | None:
    """Share of answers that cite every article their reference cites, over the references that cite one;
    None when no reference cites an article."""
    _same_length(predictions, references)
    cited = [(citations(p), citations(r)) for p, r in zip(predictions, references) if citations(r)]
    return sum(wanted <= found for found, wanted in cited) / len(cited) if cited else None


def japanese_tokens(text: str) -> list[str]:
    """Words of a Japanese text, by MeCab (sacrebleu's ja-mecab tokenizer)."""
    return _mecab()(text).split()


def _sacrebleu(words: bool = True):  # noqa: ANN202 - the module
    """sacrebleu, and where `words` (BLEU, ROUGE: Japanese word counts) MeCab and its dictionary too."""
    from shitate.errors import require

    # The MeCab tokenizer needs MeCab and its dictionary, and sacrebleu's module imports without them (it fails at
    # its first use, with a RuntimeError): import them now, not halfway through an evaluation.
    for module in ("sacrebleu.tokenizers.tokenizer_ja_mecab", "MeCab", "ipadic") if words else ():
        require(module, "eval", "BLEU and ROUGE on Japanese (with MeCab)", package="sacrebleu[ja]")
    return require("sacrebleu", "eval", "BLEU, chrF and ROUGE on Japanese" if words else "chrF")


def require_packages(words: bool) -> None:
    """Fail now, before any model answers, where a metric's package is missing: sacrebleu for chrF, and with
    `words` MeCab and its dictionary for BLEU and ROUGE."""
    _sacrebleu(words)


_MECAB = None


def _mecab():  # noqa: ANN202 - a callable tokenizer
    global _MECAB
    if _MECAB is None:
        _sacrebleu()
        from sacrebleu.tokenizers.tokenizer_ja_mecab import TokenizerJaMecab

        _MECAB = TokenizerJaMecab()
    return _MECAB


def bleu(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Corpus BLEU (0–100) with MeCab word segmentation."""
    return _sacrebleu().corpus_bleu(list(predictions), [list(references)], tokenize="ja-mecab").score


def chrf(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Corpus chrF (0–100): character n-grams, so no segmentation (and no MeCab) is involved."""
    return _sacrebleu(words=False).corpus_chrf(list(predictions), [list(references)]).score


def _ngrams(tokens: list[str], n: int) -> Counter:
    return Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))


def _lcs(a: list[str], b: list[str]) -> int:
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b):
            current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def _f(overlap: int, predicted: int, actual: int) -> float:
    if not overlap:
        return 0.0
    precision, recall = overlap / predicted, overlap / actual
    return 2 * precision * recall / (precision + recall)


def rouge(predictions: Sequence[str], references: Sequence[str], tokenize=None) -> dict[str, float]:  # noqa: ANN001
    """Mean ROUGE-1, ROUGE-2 and ROUGE-L F1 over MeCab words.

    Written here because the common ROUGE package splits on non-alphanumerics and so sees a
    Japanese sentence as one word; the definitions are Lin (2004)'s.
    """
    _same_length(predictions, references)
    tokenize = tokenize or japanese_tokens
    totals = {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}
    for prediction, reference in zip(predictions, references):
        p, r = tokenize(prediction), tokenize(reference)
        for n, key in ((1, "rouge1"), (2, "rouge2")):
            pn, rn = _ngrams(p, n), _ngrams(r, n)
            totals[key] += _f(sum((pn & rn).values()), sum(pn.values()), sum(rn.values()))
        totals["rougeL"] += _f(_lcs(p, r), len(p), len(r))
    return {k: 100 * v / len(references) for k, v in totals.items()}


def _same_length(a: Sequence[object], b: Sequence[object]) -> None:
    if len(a) != len(b) or not a:
        raise ValueError(f"predictions and references must be non-empty and of equal length ({len(a)} vs {len(b)})")
