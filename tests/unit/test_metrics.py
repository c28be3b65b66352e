"""Each metric against a value computed by hand (the arithmetic is in the comments)."""

import pytest

from shitate.evals import metrics


def test_accuracy():
    assert metrics.accuracy([1, 0, 1, 1], [1, 1, 1, 0]) == 0.5


def test_macro_precision_recall_f1():
    # a: P 1/2 R 1/1; b: P 1/1 R 1/2; c: P 1 R 1 → macro P = R = 5/6, F1 = (2/3 + 2/3 + 1)/3 = 7/9
    scores = metrics.precision_recall_f1(["a", "a", "b", "c"], ["a", "b", "b", "c"])
    assert scores == pytest.approx({"precision": 5 / 6, "recall": 5 / 6, "macro_f1": 7 / 9})


def test_pearson_and_spearman():
    # cov = 5, var_x = 2, var_y = 38/3 → r = 5 / sqrt(76/3)
    assert metrics.pearson([1, 2, 3], [2, 4, 7]) == pytest.approx(5 / (76 / 3) ** 0.5)
    # ranks of y with a tie: 1, 2.5, 2.5, 4 → r = 4.5 / sqrt(5 · 4.5)
    assert metrics.spearman([1, 2, 3, 4], [10, 20, 20, 40]) == pytest.approx(4.5 / (5 * 4.5) ** 0.5)


def test_exact_match_normalises_and_accepts_any_reference():
    assert metrics.exact_match(["東京。", " 大阪"], ["東京", ["おおさか", "大阪"]]) == 1.0
    assert metrics.exact_match(["京都", "大阪"], ["東京", "大阪"]) == 0.5


def test_character_f1():
    # 東京都 vs 東京: 2 common characters, P 2/3, R 1 → F1 0.8
    assert metrics.char_f1("東京都", "東京") == pytest.approx(0.8)
    assert metrics.mean_char_f1(["東京都", "x"], [["大阪", "東京"], "y"]) == pytest.approx(0.4)


def test_rouge_on_given_tokens():
    # R1: 3 of 4 predicted, 3 of 3 reference → F 6/7; R2: 1 of 3, 1 of 2 → 0.4; LCS a b d = 3 → 6/7
    scores = metrics.rouge(["a b c d"], ["a b d"], tokenize=str.split)
    assert scores == pytest.approx({"rouge1": 600 / 7, "rouge2": 40.0, "rougeL": 600 / 7})


def test_japanese_is_segmented_into_words_not_split_on_spaces():
    assert metrics.japanese_tokens("私は東京に行く") == ["私", "は", "東京", "に", "行く"]
    # 私/は/東京/に/行く vs 私/は/大阪/に/行く: R1 4/5 → 80, R2 2/4 → 50, LCS 4 → 80
    assert metrics.rouge(["私は東京に行く"], ["私は大阪に行く"]) == pytest.approx({"rouge1": 80, "rouge2": 50, "rougeL": 80})


def test_bleu_and_chrf():
    # 私/は/東京/に against 私/は/東京/に/行く: every n-gram precision is 1, brevity penalty exp(1 - 5/4)
    assert metrics.bleu(["私は東京に"], ["私は東京に行く"]) == pytest.approx(100 * 2.718281828 ** -0.25, rel=1e-6)
    assert metrics.bleu(["私は東京に行く"], ["私は東京に行く"]) == pytest.approx(100)
    assert metrics.chrf(["私は東京に行く"], ["私は東京に行く"]) == pytest.approx(100)
    assert metrics.chrf(["あいう"], ["かきく"]) == 0
    # 東京 vs 東京都: characters P 2/2 R 2/3, bigrams P 1/1 R 1/2 (longer orders absent) → mean P 1, R 7/12;
    # chrF = F-beta(2) of those means = 5 · 1 · 7/12 / (4 · 1 + 7/12) = 63.64
    assert metrics.chrf(["東京"], ["東京都"]) == pytest.approx(100 * 5 * (7 / 12) / (4 + 7 / 12))


def test_mismatched_lengths_are_refused():
    with pytest.raises(ValueError, match="equal length"):
        metrics.accuracy([1], [1, 2])


def test_a_missing_optional_dependency_names_the_extra(monkeypatch):
    import sys

    from shitate.errors import ShitateError

    monkeypatch.setitem(sys.modules, "sacrebleu", None)  # as if it were not installed
    with pytest.raises(ShitateError, match=r"pip install 'shitate\[eval\]'"):
        metrics.chrf(["あ"], ["あ"])


def test_sacrebleu_without_mecab_is_named_before_it_fails_inside(monkeypatch):
    """Plain `pip install sacrebleu` (no [ja]) imports, then raised a bare RuntimeError at the first Japanese BLEU."""
    import sys

    from shitate.errors import ShitateError

    monkeypatch.setitem(sys.modules, "MeCab", None)
    monkeypatch.setattr(metrics, "_MECAB", None)
    with pytest.raises(ShitateError, match=r"needs the sacrebleu\[ja\] package: pip install 'shitate\[eval\]'"):
        metrics.bleu(["空は青い"], ["空は青い"])
    with pytest.raises(ShitateError, match=r"sacrebleu\[ja\]"):
        metrics.japanese_tokens("空は青い")
    # chrF counts characters: it needs sacrebleu, not MeCab (the in-training answer check scores it)
    assert metrics.chrf(["空は青い"], ["空は青い"]) == pytest.approx(100.0)


def test_an_answer_cites_the_article_its_reference_cites():
    assert metrics.citations("就業規則第７条（試用期間）では…労基法第89条に基づき") == {"就業規則第7条", "労基法第89条"}
    answers = ["就業規則第7条（試用期間）では、6か月とする。", "第7条によると6か月です。", "6か月です。", "なし"]
    references = ["就業規則第7条（試用期間）では、次のように定めています。"] * 3 + ["規定はありません。"]
    # the second names the article but not the rules it belongs to; the fourth reference cites nothing
    assert metrics.cites_same_articles(answers, references) == pytest.approx(1 / 3)
    assert metrics.cites_same_articles(["a"], ["b"]) is None
