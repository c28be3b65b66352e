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
    assert state is not None and (state.containers, state.expecting, state.number) == (["{", "["], "number", "int")
    ahead = state.copy()
    assert ahead.feed(b"2.5e-3]}") and ahead.complete and not state.complete
    assert state.feed(b"]}") and state.complete
    assert _fed('{"n": 1') is not None and _fed('{"n": 1 , "m": {}}').complete


def test_whitespace_is_held_to_one_line_break_and_some_indentation():
    # a model held to JSON may find whitespace its likeliest fit step after step; the answer must move on
    assert _fed(" {") is None and _fed("\n{") is None  # the answer starts with its object
    assert _fed('{\n  "a": 1,\n  "b": [\n    2\n  ]\n}').complete
    assert _fed("{\n\n") is None and _fed('{"a":  ') is None and _fed("{\t") is None and _fed("{\r\n") is None
    assert _fed('{"a":\n' + " " * 20 + '"x y  z\\n\\n"') is not None  # a string's own spaces are its content
    assert _fed('{"a":\n' + " " * 21) is None


# What pydantic writes for: class Item(BaseModel): name: str; count: int
# class Order(BaseModel): customer: str; status: Literal["open", "closed"]; items: list[Item]; note: str | None;
#                         urgent: bool; total: float
ORDER = {
    "$defs": {"Item": {"properties": {"name": {"title": "Name", "type": "string"},
                                      "count": {"title": "Count", "type": "integer"}},
                       "required": ["name", "count"], "title": "Item", "type": "object"}},
    "properties": {"customer": {"type": "string"}, "status": {"enum": ["open", "closed"], "type": "string"},
                   "items": {"items": {"$ref": "#/$defs/Item"}, "type": "array"},
                   "note": {"anyOf": [{"type": "string"}, {"type": "null"}]}, "urgent": {"type": "boolean"},
                   "total": {"type": "number"}},
    "required": ["customer", "status", "items", "note", "urgent", "total"], "title": "Order", "type": "object",
}


def _fits(text: str, schema=ORDER) -> bool:
    state = JsonPrefix(schema)
    return all(state.feed(bytes([byte])) for byte in text.encode()) and state.complete


@pytest.mark.parametrize("order", [
    {"customer": "山田", "status": "open", "items": [{"name": "りんご", "count": 3}], "note": None, "urgent": False,
     "total": 12.5},
    {"status": "closed", "customer": "", "items": [], "note": "至急", "urgent": True, "total": -3},
    {"customer": "a\"b", "status": "open", "items": [{"count": 10, "name": "x"}, {"name": "y", "count": -1}],
     "note": "n", "urgent": False, "total": 1e3}])
def test_an_answer_that_fits_the_schema_passes_in_any_key_order_and_layout(order):
    for layout in ({}, {"indent": 2}, {"separators": (",", ":")}):
        assert _fits(json.dumps(order, ensure_ascii=False, **layout)), layout


@pytest.mark.parametrize(("text", "why"), [
    ('{"customer": "a", "status": "open", "items": [], "note": null, "urgent": false}', "total is required"),
    ('{"customer": "a", "customer": "b"', "a key twice"),
    ('{"client": "a"', "not a property"),
    ('{"customer": 1', "a number for a string"),
    ('{"status": "pending"', "not one of the enum"),
    ('{"items": [{"name": "x", "count": 1.5', "a fraction for an integer"),
    ('{"items": [{"name": "x", "count": 1e2', "an exponent for an integer"),
    ('{"items": ["x"', "a string for an object"),
    ('{"note": 3', "neither a string nor null"),
    ('{"urgent": "yes"', "a string for a boolean"),
    ('["a"]', "not an object"),
])
def test_what_leaves_the_schema_is_refused_at_the_byte_it_does(text, why):
    state = JsonPrefix(ORDER)
    assert not state.feed(text.encode()), why


def test_the_object_closes_only_once_every_required_key_is_in_and_takes_no_key_past_them():
    full = '{"customer": "a", "status": "open", "items": [], "note": null, "urgent": false, "total": 0'
    state = JsonPrefix(ORDER)
    assert state.feed(full.encode()) and not state.copy().feed(b",")  # every declared key is in: no comma
    assert state.feed(b"}") and state.complete
    enum_state = JsonPrefix({"type": "object", "properties": {"n": {"enum": [1, 10]}}})
    assert enum_state.feed(b'{"n": 1') and enum_state.copy().feed(b"0}") and enum_state.copy().feed(b"}")
    assert not enum_state.copy().feed(b"2")


def test_a_schema_that_cannot_be_followed_is_named():
    from shitate.serve.json_mode import schema_problem

    assert schema_problem(ORDER) is None
    assert "type object" in schema_problem({"type": "array", "items": {}})
    assert "does not point into" in schema_problem({"type": "object", "properties": {"a": {"$ref": "http://x/y"}}})
    assert "does not point into" in schema_problem({"type": "object", "properties": {"a": {"$ref": "#/$defs/Nope"}}})


def test_a_number_s_digits_are_held_to_what_a_number_needs():
    assert _fed('{"a": ' + "9" * 16) is not None and _fed('{"a": ' + "9" * 17) is None
    assert _fed('{"a": -1.' + "5" * 16 + "e+" + "1" * 3) is not None and _fed('{"a": 1e1234') is None
