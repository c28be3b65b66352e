"""Checks on the real embedded default (Gemma 3 270M); slow, so CI skips them. Run with `pytest -m slow`."""

import pytest

from conftest import MULTI_TURN
from shitate.data.templates import (
    IGNORE_INDEX,
    encode_chat,
    end_marker_is_one_token,
    get_template,
    stop_token_ids,
)

pytestmark = pytest.mark.slow

CONVERSATION = MULTI_TURN


@pytest.fixture(scope="module")
def default():
    from shitate.models.load import load_tokenizer, resolve

    source = resolve("gemma-3-270m")
    return source, load_tokenizer(source)


@pytest.mark.parametrize("name", ["gemma", "plain"])
def test_masks_with_the_real_gemma_tokenizer(default, name):
    _, tokenizer = default
    template = get_template(name, tokenizer, "gemma3_text")
    assert end_marker_is_one_token(tokenizer, template)
    example = encode_chat(CONVERSATION, tokenizer, template, 10_000)
    labelled = [t for t, label in zip(example["input_ids"], example["labels"]) if label != IGNORE_INDEX]
    expected = "".join(m["content"] + template.end_of_turn for m in CONVERSATION if m["role"] == "assistant")
    assert tokenizer.decode(labelled) == expected


def test_foreign_turn_markers_are_detected(default):
    """Gemma's tokenizer spells llama3's <|eot_id|> in pieces; training warns about it."""
    _, tokenizer = default
    assert not end_marker_is_one_token(tokenizer, get_template("llama3", tokenizer))


def test_default_model_loads_from_its_cache_and_stops_at_end_of_turn(default):
    source, tokenizer = default
    assert source.folder.endswith("gemma-3-270m.bf16")
    template = get_template("auto", tokenizer, "gemma3_text")
    assert template.name == "gemma"
    assert stop_token_ids(tokenizer, template) == [1, 106]  # <eos>, <end_of_turn>
