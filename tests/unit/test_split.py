import pytest

from conftest import kids_records
from shitate.data.split import parse_sizes, split_records
from shitate.errors import ShitateError


def questions(records):
    return {r["messages"][0]["content"] for r in records}


def test_counts_give_exact_sizes_and_disjoint_splits():
    parts = split_records(kids_records(), parse_sizes("70/30/30"), seed=1)
    assert [len(parts[n]) for n in ("train", "validation", "test")] == [70, 30, 30]
    assert not questions(parts["train"]) & questions(parts["test"])
    assert not questions(parts["validation"]) & questions(parts["test"])


def test_fractions_use_every_record():
    records = kids_records(100)
    parts = split_records(records, parse_sizes("0.8/0.1/0.1"), seed=1)
    assert [len(parts[n]) for n in ("train", "validation", "test")] == [80, 10, 10]


def test_same_seed_same_split_other_seed_other_split():
    records = kids_records()
    sizes = parse_sizes("70/30/30")
    assert split_records(records, sizes, 7) == split_records(records, sizes, 7)
    assert split_records(records, sizes, 7)["test"] != split_records(records, sizes, 8)["test"]


def test_a_repeated_question_never_lands_in_two_splits():
    records = kids_records(40)
    repeated = [{"messages": [records[0]["messages"][0], {"role": "assistant", "content": f"別の答え{i}だよ。"}]}
                for i in range(5)]
    for seed in range(20):
        parts = split_records(records + repeated, parse_sizes("0.5/0.25/0.25"), seed)
        holders = [n for n, part in parts.items() if records[0]["messages"][0]["content"] in questions(part)]
        assert len(holders) == 1


def test_bad_sizes_are_explained():
    with pytest.raises(ShitateError, match="expected three non-negative numbers"):
        parse_sizes("70/30")
    with pytest.raises(ShitateError, match="asks for 200 records but the file has 10"):
        split_records(kids_records(10), [100, 50, 50])


def test_a_split_asked_for_is_not_left_empty_by_groups_that_filled_train():
    records = kids_records(9)
    for pair in (records[0:2], records[2:4]):  # two questions about one passage each, as synth writes them
        for record in pair:
            record["context"] = pair[0]["messages"][0]["content"]
    for seed in range(20):
        parts = split_records(records, parse_sizes("0.8/0.1/0.1"), seed)
        assert [len(parts[n]) > 0 for n in ("train", "validation", "test")] == [True, True, True], seed
        assert sum(len(p) for p in parts.values()) == 9

