"""Fuzzing the readers a user's files meet first: whatever the bytes, the answer is records or a ShitateError
that names the file — never another exception (which the CLI would show as a traceback)."""

from __future__ import annotations

import json
from pathlib import Path

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shitate.config import load_recipe
from shitate.data.formats import import_records, read_chat
from shitate.data.preference import check_preference_file, read_preferences
from shitate.data.text import read_documents
from shitate.data.validate import FileReport, check_file
from shitate.errors import ConfigError, ShitateError

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
        st.sampled_from(["messages", "role", "content", "prompt", "chosen", "rejected", "text", "instruction",
                         "output", "input", "conversations", "from", "value", "context", "completion"]) | st.text(max_size=8),
        inner, max_size=5),
    max_leaves=20)
# Records near the real shapes, so the fuzzer reaches the checks behind the JSON parser.
roles = st.sampled_from(["system", "user", "assistant", "bot", "", None, 3])
messages = st.lists(st.fixed_dictionaries({"role": roles, "content": st.text(max_size=30) | json_values}), max_size=4)
near_records = (st.fixed_dictionaries({"messages": messages})
                | st.fixed_dictionaries({"prompt": st.text(max_size=20) | messages, "chosen": st.text(max_size=20) | messages,
                                         "rejected": st.text(max_size=20) | json_values})
                | st.fixed_dictionaries({"text": st.text(max_size=40) | json_values}))
lines = st.lists(st.one_of(near_records.map(lambda r: json.dumps(r, ensure_ascii=False)),
                           json_values.map(json.dumps), st.text(max_size=40)), max_size=6)


def file_contents() -> st.SearchStrategy[bytes]:
    as_text = lines.map(lambda ls: "\n".join(ls).encode("utf-8"))
    damaged = st.tuples(as_text, st.binary(max_size=8), st.integers(0, 200)).map(
        lambda t: t[0][:t[2]] + t[1] + t[0][t[2]:])
    return st.one_of(as_text, damaged, st.binary(max_size=200),
                     lines.map(lambda ls: "\n".join(ls).encode("cp932", errors="ignore")))


@FUZZ
@given(content=file_contents())
def test_every_jsonl_reader_gives_records_or_a_located_error(tmp_path_factory, content):
    path = tmp_path_factory.mktemp("fuzz") / "data.jsonl"
    path.write_bytes(content)
    for read in (import_records, lambda p: import_records(p, "csv"), read_chat, read_preferences, read_documents,
                 check_file, check_preference_file):
        try:
            result = read(path)
        except ShitateError as err:
            assert str(path) in str(err)
            continue
        if isinstance(result, FileReport):  # `data check` collects problems instead of raising
            assert result.records or result.errors
            assert all(str(problem).startswith(str(path)) for problem in result.errors)


recipe_keys = st.sampled_from(["name", "model", "stage", "template", "data", "train", "adapter", "eval", "generate",
                               "sft", "dpo", "pretrain", "method", "epochs", "learning_rate", "max_length", "rubric",
                               "validation", "r", "alpha", "batch_size", "beta", "check", "values"])
recipe_trees = st.recursive(st.none() | st.booleans() | st.integers(-3, 10**6) | st.floats(allow_nan=False)
                            | st.text(max_size=12) | st.sampled_from(["sft", "lora", "train.jsonl", "gemma", "auto"]),
                            lambda inner: st.lists(inner, max_size=3) | st.dictionaries(recipe_keys, inner, max_size=5),
                            max_leaves=25)


@FUZZ
@given(tree=recipe_trees, raw=st.text(max_size=80), overrides=st.lists(st.text(max_size=20), max_size=2))
def test_the_recipe_loader_gives_a_recipe_or_a_config_error(tmp_path_factory, tree, raw, overrides):
    folder = tmp_path_factory.mktemp("recipe")
    (folder / "train.jsonl").write_text('{"messages": []}\n', encoding="utf-8")
    for text in (yaml.safe_dump(tree, allow_unicode=True), raw):
        path = folder / "recipe.yaml"
        path.write_text(text, encoding="utf-8")
        for extra in ([], overrides):
            try:
                load_recipe(path, extra)
            except ConfigError as err:
                assert str(err)


def test_the_fuzzer_reaches_both_outcomes(tmp_path):
    """The property above would hold vacuously if every input failed the same way: a sound recipe loads."""
    (tmp_path / "train.jsonl").write_text('{"messages": []}\n', encoding="utf-8")
    path = Path(tmp_path / "recipe.yaml")
    path.write_text("name: x\ndata: {train: train.jsonl}\n", encoding="utf-8")
    assert load_recipe(path).name == "x"
