"""JSON mode and structured outputs: an answer that is one JSON object — and, given a JSON Schema, one that fits
it — whatever the model (`response_format` `{"type": "json_object"}` or `{"type": "json_schema", …}`).

At each step the likeliest words are tried in order against the answer so far, and only those that keep it the
beginning of such an object may be drawn; the answer ends when the object closes. The check is a pushdown automaton
over bytes — JSON's structure is ASCII, so a byte token of a split Japanese character is simply part of a string —
run on copies, a few bytes per candidate. Written by hand because the grammar-constrained decoders (outlines,
llguidance, xgrammar) each bring a compiler and a dependency tree for what is here two pages of JSON's own grammar.

A schema is followed as far as OpenAI's strict structured outputs and pydantic's schemas go: objects whose keys are
their declared properties (each at most once, the required ones before the object closes), arrays of `items`,
strings, numbers, integers, booleans, null, lists of types, `enum` and `const`, `anyOf`/`oneOf` told apart by the
first byte of the value, `$ref` into the schema's own `$defs`. Lengths, patterns, formats and numeric ranges are not
enforced: check them on the answer.
"""

from __future__ import annotations

import json
from typing import Any, Literal, NamedTuple

WHITESPACE = frozenset(b" \t\n\r")
# A model held to JSON can find whitespace the likeliest fit forever (a random model wrote 60 newlines, then runs of
# 24 tabs between every two tokens); as llama.cpp's JSON grammar has it, whitespace between tokens is one space, or a
# line break and at most 20 spaces or tabs of indentation, and the answer starts with its "{".
MOST_INDENT_BYTES = 20
# The same for digits (a random model wrote 55555… until max_tokens): at most 16 to a number's whole part or fraction
# (llama.cpp's grammar allows 16 to the whole part) and 3 to its exponent.
MOST_DIGITS = {"int": 16, "fraction": 16, "exponent": 3}
DIGITS = frozenset(b"0123456789")
HEX = frozenset(b"0123456789abcdefABCDEF")
ESCAPES = frozenset(b'"\\/bfnrtu')
LITERALS = {ord("t"): b"rue", ord("f"): b"alse", ord("n"): b"ull"}

Expecting = Literal["value", "first key or }", "key", ":", ", or end", "first value or ]", "string", "escape",
                    "unicode", "literal", "number", "enum", "done"]
Schema = dict[str, Any]
_KIND_OF_FIRST_BYTE = {ord("{"): "object", ord("["): "array", ord('"'): "string", ord("t"): "boolean",
                       ord("f"): "boolean", ord("n"): "null", ord("-"): "number",
                       **{digit: "number" for digit in DIGITS}}
# Where a number may stop (a digit ends it well) and where it may not (after "-", ".", "e" or the exponent's sign).
_NUMBER_MAY_END = frozenset({"int", "zero", "fraction", "exponent"})


class _Frame(NamedTuple):
    """An open object or array under a schema (None: anything goes in it)."""

    schema: Schema | None
    # an object's keys still to come, as the bytes between their quotes (encoded once, not at every byte); None: any
    keys: dict[bytes, str] | None = None

    @staticmethod
    def opened(schema: Schema | None) -> _Frame:
        properties = schema.get("properties") if schema is not None else None
        if not isinstance(properties, dict):
            return _Frame(schema)
        return _Frame(schema, {json.dumps(name, ensure_ascii=False)[1:-1].encode(): name for name in properties})


class JsonPrefix:
    """Whether bytes fed so far begin a JSON object (fitting `schema` where one is given); `complete` once the object
    has closed."""

    __slots__ = ("containers", "expecting", "in_key", "pending", "number", "blank", "indenting", "root", "frames",
                 "value_schema", "typed", "options", "integer", "digits")

    def __init__(self, schema: Schema | None = None) -> None:
        self.containers: list[str] = []  # "{" or "[" for each open one
        self.expecting: Expecting = "value"
        self.in_key = False  # the string being read is an object's key
        self.pending = b""  # a literal's or a \\u escape's bytes still to come
        self.number = ""  # where in a number: sign, zero, int, dot, fraction, e, e-sign, exponent
        self.blank = 0  # bytes of the whitespace run between tokens so far
        self.indenting = False  # the run began with a line break
        self.root = schema  # what $ref points into
        self.frames: list[_Frame] = []  # beside containers: each one's schema and keys to come
        self.value_schema: Schema | None = schema  # the schema of the value that comes next
        self.typed = b""  # the bytes so far of a key or an enum's value, held to what they may become
        self.options: tuple[bytes, ...] = ()  # an enum's values, as JSON
        self.integer = False  # the number being read may not have a fraction or an exponent
        self.digits = 0  # in the part of the number being read

    def copy(self) -> JsonPrefix:
        twin = JsonPrefix.__new__(JsonPrefix)
        for name in JsonPrefix.__slots__:
            setattr(twin, name, getattr(self, name))
        twin.containers, twin.frames = list(self.containers), list(self.frames)  # the only mutable ones
        return twin

    @property
    def complete(self) -> bool:
        return self.expecting == "done"

    def feed(self, data: bytes) -> bool:
        """Take `data`; False (and this state no longer meaningful) if it cannot continue a JSON object."""
        return all(self._byte(byte) for byte in data)

    def _byte(self, byte: int) -> bool:
        state = self.expecting
        if state == "done":
            return False
        if state in ("string", "escape", "unicode"):
            if self.in_key and self._keys() is not None:
                return self._key_byte(byte)
            return self._string_byte(byte)
        if state == "enum":
            return self._enum_byte(byte)
        if state == "literal":
            if byte != self.pending[0]:
                return False
            self.pending = self.pending[1:]
            if not self.pending:
                self.expecting = self._after_value()
            return True
        if state == "number":
            if self._number_byte(byte):
                return True
            if self.number not in _NUMBER_MAY_END:
                return False
            self.expecting = self._after_value()
            return self._byte(byte)  # the byte that ended the number is read as what follows it
        if byte in WHITESPACE:
            return self._blank(byte)
        self.blank = 0
        return self._structure_byte(byte)

    def _blank(self, byte: int) -> bool:
        if not self.containers:  # before the object
            return False
        if self.blank == 0:  # a run starts with a space (and is that space) or a line break
            fits = byte in b" \n"
            self.indenting = byte == ord("\n")
        else:
            fits = self.indenting and byte in b" \t" and self.blank <= MOST_INDENT_BYTES
        self.blank += 1
        return fits

    def _string_byte(self, byte: int) -> bool:
        if self.expecting == "escape":
            if byte not in ESCAPES:
                return False
            self.expecting, self.pending = ("unicode", b"0000") if byte == ord("u") else ("string", b"")
            return True
        if self.expecting == "unicode":
            self.pending = self.pending[1:]
            if not self.pending:
                self.expecting = "string"
            return byte in HEX
        if byte == ord('"'):
            self.expecting = ":" if self.in_key else self._after_value()
        elif byte == ord("\\"):
            self.expecting = "escape"
        return byte >= 0x20  # a control character must be escaped

    def _structure_byte(self, byte: int) -> bool:
        """A byte between tokens: opening a value or a key, a colon, a comma or a closing bracket."""
        state = self.expecting
        if state in ("value", "first value or ]"):
            if state == "first value or ]" and byte == ord("]"):
                return self._close("[")
            if not self.containers and byte != ord("{"):
                return False  # the answer is an object
            return self._value(byte)
        if state in ("first key or }", "key"):
            if state == "first key or }" and byte == ord("}"):
                return self._close("{")
            if byte != ord('"') or self._keys() == {}:  # every declared key is in already
                return False
            self.expecting, self.in_key, self.typed = "string", True, b""
            return True
        if state == ":":
            if byte != ord(":"):
                return False
            self.expecting = "value"
            return True
        # ", or end": after a value inside an object or array
        if byte == ord(","):
            if self.containers[-1] == "[":
                self.expecting, self.value_schema = "value", self._items()
                return True
            self.expecting = "key"
            return self._keys() != {}
        if byte in (ord("}"), ord("]")):
            return self._close("{" if byte == ord("}") else "[")
        return False

    def _value(self, byte: int) -> bool:
        fits, schema = self._pick(self.value_schema, byte)
        if not fits:
            return False
        if schema is not None and ("enum" in schema or "const" in schema):
            self.expecting, self.options, self.typed = "enum", _options(schema), b""
            return self._enum_byte(byte)
        if byte == ord("{"):
            self.containers.append("{")
            self.frames.append(_Frame.opened(schema))
            self.expecting = "first key or }"
        elif byte == ord("["):
            self.containers.append("[")
            self.frames.append(_Frame.opened(schema))
            self.expecting, self.value_schema = "first value or ]", self._items()
        elif byte == ord('"'):
            self.expecting, self.in_key = "string", False
        elif byte in LITERALS:
            self.expecting, self.pending = "literal", LITERALS[byte]
        elif byte == ord("-") or byte in DIGITS:
            self.expecting = "number"
            self.number = "sign" if byte == ord("-") else ("zero" if byte == ord("0") else "int")
            self.digits = int(byte in DIGITS)
            self.integer = schema is not None and "number" not in (_kinds(schema) or {"number"})
        else:
            return False
        return True

    # --- the schema ------------------------------------------------------------------------------------------------
    def _resolve(self, schema: Schema) -> Schema:
        """`schema` with its `$ref` followed into the root schema (and a lone `allOf`, as pydantic wrote refs)."""
        for _ in range(64):  # a ref that points at itself is not followed for ever
            if "$ref" in schema:
                node: Any = self.root
                for part in str(schema["$ref"]).removeprefix("#/").split("/"):
                    node = node[part]
                schema = node
            elif len(schema.get("allOf") or []) == 1:
                schema = schema["allOf"][0]
            else:
                break
        return schema

    def _pick(self, schema: Schema | None, byte: int) -> tuple[bool, Schema | None]:
        """Whether a value under `schema` may start with `byte`, and the schema it then follows (None: anything).
        Of anyOf's branches, the one the first byte allows; where several do, the value is not held to either."""
        if schema is None:
            return True, None
        schema = self._resolve(schema)
        branches = schema.get("anyOf") or schema.get("oneOf")
        if branches:
            fitting = [branch for branch in (self._resolve(b) for b in branches) if self._pick(branch, byte)[0]]
            if len(fitting) == 1:
                return self._pick(fitting[0], byte)
            return bool(fitting), None
        if "enum" in schema or "const" in schema:
            return any(option[:1] == bytes([byte]) for option in _options(schema)), schema
        kinds = _kinds(schema)
        if kinds is None:
            return True, None
        kind = _KIND_OF_FIRST_BYTE.get(byte)
        return kind in kinds or (kind == "number" and "integer" in kinds), schema

    def _keys(self) -> dict[bytes, str] | None:
        """The keys the open object may still take (None: any key)."""
        return self.frames[-1].keys if self.frames else None

    def _key_byte(self, byte: int) -> bool:
        """A byte of a key held to the object's properties: the key so far begins one, and ends as one."""
        frame = self.frames[-1]
        keys = frame.keys or {}
        if self.expecting == "string" and byte == ord('"'):
            if self.typed not in keys:
                return False
            name = keys[self.typed]
            self.frames[-1] = frame._replace(keys={k: v for k, v in keys.items() if k != self.typed})
            self.value_schema = (frame.schema or {})["properties"][name]
            self.expecting = ":"
            return True
        self.typed += bytes([byte])
        return any(key.startswith(self.typed) for key in keys) and self._string_byte(byte)

    def _items(self) -> Schema | None:
        schema = self.frames[-1].schema if self.frames else None
        items = schema.get("items") if schema is not None else None
        return items if isinstance(items, dict) else None

    def _enum_byte(self, byte: int) -> bool:
        """A byte of a value held to an enum's (or a const's) values, written as JSON."""
        typed = self.typed + bytes([byte])
        if any(option.startswith(typed) for option in self.options):
            self.typed = typed
            if typed in self.options and not any(len(o) > len(typed) and o.startswith(typed) for o in self.options):
                self.expecting = self._after_value()
            return True
        if self.typed in self.options:  # a value that could have gone on (1, of 1 and 10) ended here
            self.expecting = self._after_value()
            return self._byte(byte)
        return False

    def _number_byte(self, byte: int) -> bool:
        """Move within a number; False where the byte is not part of it."""
        where, digit = self.number, byte in DIGITS
        if self.integer and byte in b".eE":
            return False
        if digit and where in MOST_DIGITS:
            self.digits += 1
            return self.digits <= MOST_DIGITS[where]
        self.digits = int(digit)
        if where == "sign" and digit:
            self.number = "zero" if byte == ord("0") else "int"
        elif where in ("zero", "int") and byte == ord("."):
            self.number = "dot"
        elif where in ("dot", "fraction") and digit:
            self.number = "fraction"
        elif where in ("zero", "int", "fraction") and byte in (ord("e"), ord("E")):
            self.number = "e"
        elif where == "e" and byte in (ord("+"), ord("-")):
            self.number = "e-sign"
        elif where in ("e", "e-sign") and digit:
            self.number = "exponent"
        else:
            return False
        return True

    def _close(self, bracket: str) -> bool:
        if not self.containers or self.containers[-1] != bracket:
            return False
        frame = self.frames[-1]  # frames run beside containers
        if bracket == "{" and frame.keys is not None:
            required = set((frame.schema or {}).get("required") or ())
            if any(name in required for name in frame.keys.values()):
                return False  # a required key is still missing
        self.containers.pop()
        self.frames.pop()
        self.expecting = self._after_value()
        return True

    def _after_value(self) -> Expecting:
        return ", or end" if self.containers else "done"


def _kinds(schema: Schema) -> set[str] | None:
    """The JSON types a schema allows; None where it says nothing of them."""
    kind = schema.get("type")
    if kind is None:
        if "properties" in schema:
            return {"object"}
        return {"array"} if "items" in schema else None
    return set(kind) if isinstance(kind, list) else {kind}


def _options(schema: Schema) -> tuple[bytes, ...]:
    values = [schema["const"]] if "const" in schema else list(schema["enum"])
    return tuple(json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode() for value in values)


def schema_problem(schema: Any) -> str | None:
    """Why a request's schema cannot be followed here, or None: the answer is an object, and a $ref points into the
    schema itself."""
    if not isinstance(schema, dict):
        return "give the schema as a JSON object"
    if (schema.get("type") or "object") != "object" and "properties" not in schema:
        return "the answer is an object: give a schema of type object"
    for ref in _refs(schema):
        node: Any = schema
        for part in ref.removeprefix("#/").split("/"):
            node = node.get(part) if isinstance(node, dict) else None
        if not ref.startswith("#/") or not isinstance(node, dict):
            return f"$ref {ref!r} does not point into the schema's own definitions"
    return None


def _refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        own = [str(node["$ref"])] if "$ref" in node else []
        return own + [ref for value in node.values() for ref in _refs(value)]
    if isinstance(node, list):
        return [ref for value in node for ref in _refs(value)]
    return []
