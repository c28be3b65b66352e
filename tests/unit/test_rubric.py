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


def test_json_and_japanese_checks():
    is_json = RubricCheck(name="json", check="is_json")
    assert passes(is_json, '{"a": 1}') and not passes(is_json, "{a: 1}")
    japanese = RubricCheck(name="ja", check="japanese", value=0.8)
    assert passes(japanese, "空が青いのは光が散らばるからだよ。")
    assert not passes(japanese, "The sky is blue because of Rayleigh scattering です")  # 2 of 40 letters


def test_an_unknown_rubric_check_is_a_recipe_error(tmp_path):
    import pytest

    from shitate.config import load_recipe
    from shitate.errors import ConfigError

    (tmp_path / "t.jsonl").write_text("", encoding="utf-8")
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: x\ndata: {train: t.jsonl}\neval: {rubric: [{name: n, check: is_polite}]}\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"eval.rubric.0.check"):
        load_recipe(recipe)


def test_a_rubric_check_without_what_it_checks_is_refused():
    import pytest
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="needs `values"):
        RubricCheck(name="n", check="ends_with")
    with pytest.raises(ValidationError, match="needs `value:` a whole number"):
        RubricCheck(name="n", check="max_sentences")
