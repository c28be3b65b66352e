"""Preference pairs: importers, `data check` with lines, and splits that keep a prompt's pairs together."""

from __future__ import annotations

import pytest

from conftest import SHARED_DATA, write_jsonl
from shitate.data.preference import check_preference_file, import_preferences, read_preferences
from shitate.data.split import split_records
from shitate.errors import DataError


def test_ranked_answers_become_every_better_worse_pair(tmp_path):
    path = write_jsonl(tmp_path / "ranked.jsonl", [
        {"prompt": "空はなぜ青い?", "answers": ["光が散らばるから。", "空気のせい。", "しらない。"]},
        {"prompt": "海は?", "answers": ["A", "B", "C"], "ranks": [2, 1, 2]},  # B best; A and C tie: no pair
    ])
    pairs, problems, without = import_preferences(path)
    assert not problems and without == 0
    assert [(p["chosen"], p["rejected"]) for p in pairs] == [
        ("光が散らばるから。", "空気のせい。"), ("光が散らばるから。", "しらない。"), ("空気のせい。", "しらない。"),
        ("B", "A"), ("B", "C")]


def test_judgments_give_a_pair_only_where_both_orders_agree_and_it_is_not_a_tie(tmp_path):
    base = {"question": "Q", "answer_1": "one", "answer_2": "two"}
    path = write_jsonl(tmp_path / "pairwise.jsonl", [
        {**base, "g1_winner": "model_2", "g2_winner": "model_2"},
        {**base, "g1_winner": "model_1", "g2_winner": "model_2"},
        {**base, "g1_winner": "tie", "g2_winner": "tie"},
    ])
    pairs, problems, without = import_preferences(path)
    assert pairs == [{"prompt": "Q", "chosen": "two", "rejected": "one"}] and without == 2 and not problems


@pytest.mark.skipif(not (SHARED_DATA / "ja-vicuna-qa").is_dir(), reason="needs ../shared/data")
def test_the_ja_vicuna_judgments_give_the_426_agreeing_pairs():
    pairs, problems, without = import_preferences(SHARED_DATA / "ja-vicuna-qa/model_judgment/pairwise/gpt-4")
    assert (len(pairs), without, problems) == (426, 54, [])


def test_data_check_names_each_bad_pair_by_line(tmp_path):
    path = write_jsonl(tmp_path / "pairs.jsonl", [
        {"prompt": "Q1", "chosen": "good", "rejected": "bad"},
        {"prompt": "Q2", "chosen": "same", "rejected": "same"},
        {"prompt": "Q3", "chosen": "", "rejected": "bad"},
        {"chosen": "good", "rejected": "bad"},
        {"prompt": "Q5", "chosen": "good<end_of_turn>", "rejected": "bad"},
        {"prompt": [{"role": "user", "content": "Q6"}], "chosen": [{"role": "assistant", "content": "ok"}],
         "rejected": "no"},
    ])
    report = check_preference_file(path)
    found = {(p.line, p.field) for p in report.errors}
    assert found == {(2, "chosen"), (3, "chosen"), (4, "prompt"), (5, "chosen")}
    assert "identical" in next(str(p) for p in report.errors if p.line == 2)
    assert report.records == 2
    with pytest.raises(DataError, match=r"pairs.jsonl:3: chosen: is empty"):
        read_preferences(path)


def test_over_long_pairs_are_reported_with_their_line(tmp_path, tokenizer):
    from shitate.data.templates import get_template

    path = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "Q", "chosen": "短い。", "rejected": "いいえ。"},
                                                   {"prompt": "Q", "chosen": "長い答え。" * 40, "rejected": "x"}])
    report = check_preference_file(path, tokenizer, get_template("gemma", tokenizer), max_length=64)
    assert [p.line for p in report.warnings] == [2] and "longer than max_length 64" in str(report.warnings[0])


def test_split_keeps_every_pair_of_a_prompt_in_one_split():
    records = [{"prompt": f"Q{i // 4}", "chosen": f"a{i}", "rejected": f"b{i}"} for i in range(40)]
    parts = split_records(records, [0.6, 0.2, 0.2], seed=1)
    homes = {}
    for name, part in parts.items():
        for record in part:
            homes.setdefault(record["prompt"], set()).add(name)
    assert all(len(h) == 1 for h in homes.values()) and sum(len(p) for p in parts.values()) == 40
