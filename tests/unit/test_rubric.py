import pytest

from shitate.config import RubricCheck
from shitate.evals.rubric import count_sentences, passes, score


@pytest.mark.parametrize("text, sentences", [
    ("空が青いのは光が散らばるからだよ。", 1),
    ("空が青いのは光が散らばるからだよ", 1),
    ("青いよ。光のせいだよ。", 2),
    ("本当?そうだよ!", 2),
    ("一行目\n二行目", 2),
    ("「そうだよ。」", 1),
    ("", 0),
])
def test_count_sentences(text, sentences):
    assert count_sentences(text) == sentences


def test_rubric_scores_each_answer():
    checks = [RubricCheck(name="よ", check="ends_with", values=["よ", "よ。"]),
              RubricCheck(name="一文", check="max_sentences", value=1),
              RubricCheck(name="短い", check="max_chars", value=11)]
    answers = ["光が散らばるからだよ。", "光のせいです。そうです。", "だよ"]
    assert score(checks, answers) == {"よ": 2, "一文": 2, "短い": 2}
    assert passes(RubricCheck(name="r", check="regex", values=[r"^光"]), "光のせい")
    assert not passes(RubricCheck(name="n", check="not_contains", values=["です"]), "そうです")
