import pytest

from shitate.evals import judge as judging


@pytest.mark.parametrize("mode, text, expected", [
    ("score", "理由…\n評価: 85", 85),
    ("score", "評価：120", None),
    ("score", "よい回答です。", None),
    ("likert", "評価: 1\n評価: 2", 2),
    ("pairwise", "Aの方が丁寧。\n勝者: A", "A"),
    ("pairwise", "勝者：Ｂ", "B"),
    ("pairwise", "勝者: 引き分け", "tie"),
])
def test_parse_reads_the_last_verdict(mode, text, expected):
    assert judging.parse(mode, text) == expected


def test_unparseable_output_is_retried_then_counted():
    calls = []

    def ask(prompts):
        calls.append(len(prompts))
        return ["評価: 70" if "2番" in p and judging.RETRY_NOTE in p else "うーん" for p in prompts]

    verdicts = judging.judge(ask, "score", ["1番", "2番"], retries=2)
    assert verdicts.values == [None, 70]
    assert verdicts.unparseable == 1 and verdicts.retried == 3 and calls == [2, 2, 1]


def test_pairwise_asks_both_orders_and_cancels_position_bias():
    template = judging.load_prompt("pairwise")
    always_first = lambda prompts: ["勝者: A"] * len(prompts)  # noqa: E731 - a judge with pure position bias
    result = judging.pairwise(always_first, template, ["q1", "q2"], ["a1", "a2"], ["b1", "b2"])
    assert (result["first"], result["second"], result["tie"], result["consistent_in_both_orders"]) == (0, 0, 2, 0)

    def prefers_yo(prompts):  # a judge that likes answers ending in よ, wherever they stand
        out = []
        for p in prompts:
            a = p.split("[アシスタントAの回答]\n")[1].split("\n")[0]
            out.append("勝者: A" if a.endswith("よ") else "勝者: B")
        return out

    result = judging.pairwise(prefers_yo, template, ["q1", "q2"], ["ちがう", "そうだよ"], ["青いよ", "ちがう"])
    assert (result["first"], result["second"], result["tie"], result["consistent_in_both_orders"]) == (1, 1, 0, 2)


def test_ensemble_combines_and_reports_agreement():
    scores = judging.Ensemble("score", [[80, 50, None], [90, 20, None]])
    assert scores.combined() == [85, 35, None]
    assert scores.agreement() == 0.5  # within 10 points on the first item only
    votes = judging.Ensemble("pairwise", [["first", "tie", "second"], ["first", "second", "second"], ["first", "first", None]])
    assert votes.combined() == ["first", "tie", "second"]
    assert votes.agreement() == pytest.approx(2 / 3)


def test_a_prompt_without_its_placeholders_is_refused(tmp_path):
    bad = tmp_path / "judge.txt"
    bad.write_text("{question} だけ", encoding="utf-8")
    with pytest.raises(Exception, match=r"needs the placeholders \{answer_a\}, \{answer_b\}"):
        judging.load_prompt("pairwise", bad)
