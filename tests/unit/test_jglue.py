"""The JGLUE task code on files written here in JGLUE v1.3's own layout, with fake scorers whose answers are known:
a fresh clone without ../shared/data still tests loading, prompting, choosing and scoring."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from shitate.errors import ShitateError
from shitate.evals.tasks import jglue


def write_lines(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    jglue_folder = tmp_path / "jglue"
    jglue_folder.mkdir()
    write_lines(jglue_folder / "jcommonsenseqa-valid.json", [
        {"q_id": 0, "question": "空の色は?", **{f"choice{i}": c for i, c in enumerate(["赤", "青", "緑", "黒", "白"])}, "label": 1},
        {"q_id": 1, "question": "夜の空は?", **{f"choice{i}": c for i, c in enumerate(["赤", "青", "緑", "黒", "白"])}, "label": 3},
    ])
    write_lines(jglue_folder / "jnli-valid.json", [
        {"sentence_pair_id": "0", "sentence1": "犬が走る。", "sentence2": "動物が動く。", "label": "entailment"},
        {"sentence_pair_id": "1", "sentence1": "犬が寝る。", "sentence2": "犬が走る。", "label": "contradiction"},
        {"sentence_pair_id": "2", "sentence1": "犬がいる。", "sentence2": "猫もいる。", "label": "neutral"},
        {"sentence_pair_id": "3", "sentence1": "雨が降る。", "sentence2": "道が濡れる。", "label": "entailment"},
    ])
    write_lines(jglue_folder / "jsts-valid.json", [
        {"sentence_pair_id": str(i), "sentence1": f"文{i}", "sentence2": f"文{i}'", "label": score}
        for i, score in enumerate([0.0, 1.5, 3.0, 5.0])])
    (jglue_folder / "jsquad-valid.json").write_text(json.dumps({"version": "v1.3", "data": [{"title": "富士山", "paragraphs": [
        {"context": "富士山は日本一高い山で、標高は3776メートルである。", "qas": [
            {"id": "a", "question": "富士山の標高は?", "answers": [{"text": "3776メートル", "answer_start": 17},
                                                                {"text": "3776メートル", "answer_start": 17}]},
            {"id": "b", "question": "富士山はどこにある?", "answers": [{"text": "日本", "answer_start": 4}]}]}]}]},
        ensure_ascii=False), encoding="utf-8")
    return jglue_folder


def test_loaders_read_jglue_layout_and_respect_the_limit(folder):
    assert jglue.load_jcommonsenseqa(folder)[0] == {"question": "空の色は?", "choices": ["赤", "青", "緑", "黒", "白"], "label": 1}
    assert len(jglue.load_jnli(folder, limit=2)) == 2
    assert [r["score"] for r in jglue.load_jsts(folder)] == [0.0, 1.5, 3.0, 5.0]
    squad = jglue.load_jsquad(folder)
    assert squad[0]["answers"] == ["3776メートル"] and squad[1]["question"] == "富士山はどこにある?"
    with pytest.raises(ShitateError, match="jnli-valid.json: JGLUE file not found. Point --jglue"):
        jglue.load_jnli(folder.parent)


def fake_logprobs(preferred: dict[str, str]):
    """Log-likelihoods that favour, for a prompt containing a key, the choice named by its value."""

    def score(loaded, prompts, choices):
        assert loaded == "model" and len(prompts) == len(choices)
        out = []
        for prompt, options in zip(prompts, choices):
            wanted = next((choice for key, choice in preferred.items() if key in prompt), None)
            out.append([0.0 if option == wanted else -5.0 for option in options])
        return out

    return score


def test_multiple_choice_picks_the_most_likely_answer(folder):
    rows = jglue.load_jcommonsenseqa(folder)
    result = jglue.run_jcommonsenseqa("model", rows, logprobs=fake_logprobs({"空の色": "青", "夜の空": "白"}))
    assert result.predictions == [1, 4] and result.metrics == {"accuracy": 0.5}


def test_nli_reports_accuracy_and_macro_scores_over_its_three_labels(folder):
    rows = jglue.load_jnli(folder)
    # Right on pairs 0, 1 and 2; pair 3 (entailment) is called neutral.
    result = jglue.run_jnli("model", rows, logprobs=fake_logprobs(
        {"動物が動く": "含意", "犬が寝る": "矛盾", "猫もいる": "中立", "道が濡れる": "中立"}))
    assert result.predictions == ["entailment", "contradiction", "neutral", "neutral"]
    assert result.metrics["accuracy"] == 0.75
    # entailment P 1, R 1/2; contradiction P 1, R 1; neutral P 1/2, R 1 → macro F1 = (2/3 + 1 + 2/3) / 3
    assert result.metrics["macro_f1"] == pytest.approx((2 / 3 + 1 + 2 / 3) / 3)


def test_similarity_is_the_expected_score_under_the_model(folder):
    rows = jglue.load_jsts(folder)

    def certain(loaded, prompts, choices):  # all probability on the gold score, rounded
        gold = {f"文{i}": round(r["score"]) for i, r in enumerate(rows)}
        return [[0.0 if int(c) == gold[p.split("文1: ")[1].split("\n")[0]] else -50.0 for c in cs]
                for p, cs in zip(prompts, choices)]

    result = jglue.run_jsts("model", rows, logprobs=certain)
    assert result.predictions == pytest.approx([0.0, 2.0, 3.0, 5.0])
    assert result.metrics["spearman"] == pytest.approx(1.0) and 0.98 < result.metrics["pearson"] < 1.0


def test_jsquad_scores_the_first_line_of_each_answer(folder):
    rows = jglue.load_jsquad(folder)
    answers = iter(["3776メートル\n以上です", "日本の静岡"])
    result = jglue.run_jsquad("model", rows, generate=lambda loaded, prompts: [next(answers) for _ in prompts])
    assert result.predictions == ["3776メートル", "日本の静岡"]
    assert result.metrics["exact_match"] == 0.5
    # "日本" against "日本の静岡": precision 2/5, recall 1 → F1 4/7
    assert result.metrics["char_f1"] == pytest.approx((1 + 4 / 7) / 2)
