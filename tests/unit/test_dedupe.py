"""Exact and near duplicates, and leakage of test questions into training data."""

from __future__ import annotations

import json

from shitate.data.dedupe import dedupe_file, duplicates, leakage_problems


def chat(question, answer="答え"):
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}


def write(path, records):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def test_exact_and_near_duplicates_point_at_the_first_copy():
    texts = ["年次有給休暇は何日もらえますか。", "出張旅費はどう精算しますか。", "年次有給休暇は何日もらえますか？",
             "ＡＢＣ　社の規程は？", "ABC社の規程は?", "年次有給休暇は何日もらえますか。教えて"]
    found = {(m.index, m.of): m.similarity for m in duplicates(texts, threshold=0.6)}
    assert set(found) == {(2, 0), (4, 3), (5, 0)}
    assert found[(4, 3)] == 1.0  # width, case and spaces do not make a question new
    assert 0.8 <= found[(5, 0)] < 1.0
    assert [(m.index, m.of) for m in duplicates(texts, threshold=0.95)] == [(4, 3)]


def test_dedupe_file_keeps_the_first_and_names_the_lines(tmp_path):
    path = write(tmp_path / "train.jsonl", [chat("試用期間は何か月ですか。"), chat("賞与は年何回ですか。"),
                                             chat("試用期間は何か月ですか。", "別の答え")])
    kept, notes = dedupe_file(path)
    assert [r["messages"][0]["content"] for r in kept] == ["試用期間は何か月ですか。", "賞与は年何回ですか。"]
    assert [str(n) for n in notes] == [f"{path}:3: repeats line 1"]


def test_a_training_question_that_repeats_a_test_question_is_flagged(tmp_path):
    test = write(tmp_path / "test.jsonl", [chat("試用期間は何か月ですか。"), chat("通勤手当の上限はいくらですか。")])
    train = write(tmp_path / "train.jsonl", [chat("賞与は年何回ですか。"), chat("試用期間は何か月ですか。"),
                                              chat("通勤手当の上限はいくらですか？教えて")])
    errors, warnings = leakage_problems(train, test, threshold=0.6)
    assert [str(e).split(" — ")[0] for e in errors] == [f"{train}:2: repeats the test question at {test}:1"]
    assert len(warnings) == 1 and str(warnings[0]).startswith(f"{train}:3: nearly repeats the test question at {test}:2")
