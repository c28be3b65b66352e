"""JSON mode's check (serve/json_mode.py): every beginning of a JSON object passes, and nothing else does,
against Python's own json module."""

import json
import random

import pytest

from shitate.serve.json_mode import JsonPrefix


def _fed(text: str) -> JsonPrefix | None:
    state = JsonPrefix()
    return state if state.feed(text.encode()) else None


def _random_value(rng: random.Random, depth: int = 0):
    kinds = ["str", "int", "float", "bool", "null"] + (["dict", "list"] * 2 if depth < 3 else [])
    kind = rng.choice(kinds)
    if kind == "dict":
        return {_random_text(rng): _random_value(rng, depth + 1) for _ in range(rng.randint(0, 3))}
    if kind == "list":
        return [_random_value(rng, depth + 1) for _ in range(rng.randint(0, 3))]
    return {"str": lambda: _random_text(rng), "int": lambda: rng.randint(-10**6, 10**6),
            "float": lambda: rng.choice([0.5, -1e-7, 3.25e12, -0.0, 12.0]), "bool": lambda: rng.random() < 0.5,
            "null": lambda: None}[kind]()


def _random_text(rng: random.Random) -> str:
    return "".join(rng.choice(["a", "空", "は", " ", '"', "\\", "\n", "\t", "/", "é", "😀", "\u0001"])
                   for _ in range(rng.randint(0, 6)))


@pytest.mark.parametrize("seed", range(40))
def test_every_beginning_of_an_object_passes_and_it_is_complete_only_at_its_end(seed):
    rng = random.Random(seed)
    value = {_random_text(rng): _random_value(rng) for _ in range(rng.randint(0, 4))}
    text = json.dumps(value, ensure_ascii=rng.random() < 0.5, indent=rng.choice([None, 2]),
                      separators=rng.choice([None, (",", ":")]))
    data = text.encode()
    state = JsonPrefix()
    for i, byte in enumerate(data):  # a byte at a time, as tokens split Japanese characters into bytes
        assert not state.complete and state.feed(bytes([byte])), (text, i)
    assert state.complete and json.loads(text) == value
    assert not state.copy().feed(b" ")  # the answer ends where the object closes


@pytest.mark.parametrize("text", ['"a"', "[1]", "1", "true", "{'a': 1}", '{"a" 1}', '{"a": 1,}', '{,}', '{"a": 01}',
                                  '{"a": 1.}', '{"a": -}', '{"a": 1e}', '{"a": tru }', '{"a": "\\x"}', '{"a": "\\u12g4"}',
                                  '{"a": "tab\there"}', '{"a": [1, 2}', '{"a": NaN}', '{"a": 1}}', '{"a": [1 2]}'])
def test_what_cannot_begin_an_object_is_refused(text):
    def not_json(constant: str):
        raise json.JSONDecodeError(f"{constant} is Python's, not JSON's", text, 0)

    with pytest.raises(json.JSONDecodeError):  # Python's json agrees that none is an object...
        value = json.loads(text, parse_constant=not_json)
        if not isinstance(value, dict):
            raise json.JSONDecodeError("not an object", text, 0)
    assert _fed(text) is None  # ...and each is refused at some byte


def test_a_copy_is_independent_and_numbers_end_at_what_follows_them():
    state = _fed('{"n": [1')
    assert state is not None
    ahead = state.copy()
    assert ahead.feed(b"2.5e-3]}") and ahead.complete and not state.complete
    assert state.feed(b"]}") and state.complete
    assert _fed('{"n": 1') is not None and _fed('{"n": 1 , "m": {}}').complete


def test_whitespace_is_held_to_one_line_break_and_some_indentation():
    # a model held to JSON may find whitespace its likeliest fit step after step; the answer must move on
    assert _fed(" {") is None and _fed("\n{") is None  # the answer starts with its object
    assert _fed('{\n  "a": 1,\n  "b": [\n    2\n  ]\n}').complete
    assert _fed("{\n\n") is None and _fed('{"a":' + " " * 25) is None
    assert _fed('{"a":' + " " * 24 + '"x y  z\\n\\n"') is not None  # a string's own spaces are its content
