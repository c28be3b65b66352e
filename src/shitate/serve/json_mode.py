"""JSON mode (`response_format: {"type": "json_object"}`): an answer that is one JSON object, whatever the model.

At each step the likeliest words are tried in order against the answer so far, and only those that keep it the
beginning of a JSON object may be drawn; the answer ends when the object closes. The check is a pushdown automaton
over bytes — JSON's structure is ASCII, so a byte token of a split Japanese character is simply part of a string —
run on copies, a few bytes per candidate. Written by hand because the grammar-constrained decoders (outlines,
llguidance, xgrammar) each bring a compiler and a dependency tree for what is here one page of JSON's own grammar.
"""

from __future__ import annotations

from typing import Literal

WHITESPACE = frozenset(b" \t\n\r")
# A model held to JSON can find whitespace the likeliest fit forever (a random model wrote 60 newlines); as
# llama.cpp's JSON grammar does, a run between tokens is at most one line break and some indentation, and the answer
# starts with its "{".
MOST_BLANK_BYTES = 24
DIGITS = frozenset(b"0123456789")
HEX = frozenset(b"0123456789abcdefABCDEF")
ESCAPES = frozenset(b'"\\/bfnrtu')
LITERALS = {ord("t"): b"rue", ord("f"): b"alse", ord("n"): b"ull"}

Expecting = Literal["value", "first key or }", "key", ":", ", or end", "first value or ]", "string", "escape",
                    "unicode", "literal", "number", "done"]
# Where a number may stop (a digit ends it well) and where it may not (after "-", ".", "e" or the exponent's sign).
_NUMBER_MAY_END = frozenset({"int", "zero", "fraction", "exponent"})


class JsonPrefix:
    """Whether bytes fed so far begin a JSON object; `complete` once the object has closed."""

    __slots__ = ("containers", "expecting", "in_key", "pending", "number", "blank", "line_breaks")

    def __init__(self) -> None:
        self.containers: list[str] = []  # "{" or "[" for each open one
        self.expecting: Expecting = "value"
        self.in_key = False  # the string being read is an object's key
        self.pending = b""  # a literal's or a \\u escape's bytes still to come
        self.number = ""  # where in a number: sign, zero, int, dot, fraction, e, e-sign, exponent
        self.blank = self.line_breaks = 0  # the whitespace run between tokens so far

    def copy(self) -> JsonPrefix:
        twin = JsonPrefix.__new__(JsonPrefix)
        twin.containers, twin.expecting, twin.in_key = list(self.containers), self.expecting, self.in_key
        twin.pending, twin.number = self.pending, self.number
        twin.blank, twin.line_breaks = self.blank, self.line_breaks
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
            return self._string_byte(byte)
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
        self.blank = self.line_breaks = 0
        return self._structure_byte(byte)

    def _blank(self, byte: int) -> bool:
        if not self.containers:  # before the object
            return False
        self.blank += 1
        self.line_breaks += byte in b"\r\n"
        return self.blank <= MOST_BLANK_BYTES and self.line_breaks <= 1

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
                return False  # JSON mode's answer is an object
            return self._value(byte)
        if state in ("first key or }", "key"):
            if state == "first key or }" and byte == ord("}"):
                return self._close("{")
            if byte != ord('"'):
                return False
            self.expecting, self.in_key = "string", True
            return True
        if state == ":":
            if byte != ord(":"):
                return False
            self.expecting = "value"
            return True
        # ", or end": after a value inside an object or array
        if byte == ord(","):
            self.expecting = "key" if self.containers[-1] == "{" else "value"
            return True
        if byte in (ord("}"), ord("]")):
            return self._close("{" if byte == ord("}") else "[")
        return False

    def _value(self, byte: int) -> bool:
        if byte == ord("{"):
            self.containers.append("{")
            self.expecting = "first key or }"
        elif byte == ord("["):
            self.containers.append("[")
            self.expecting = "first value or ]"
        elif byte == ord('"'):
            self.expecting, self.in_key = "string", False
        elif byte in LITERALS:
            self.expecting, self.pending = "literal", LITERALS[byte]
        elif byte == ord("-") or byte in DIGITS:
            self.expecting = "number"
            self.number = "sign" if byte == ord("-") else ("zero" if byte == ord("0") else "int")
        else:
            return False
        return True

    def _number_byte(self, byte: int) -> bool:
        """Move within a number; False where the byte is not part of it."""
        where, digit = self.number, byte in DIGITS
        if where == "sign" and digit:
            self.number = "zero" if byte == ord("0") else "int"
        elif where in ("int", "fraction", "exponent") and digit:
            pass
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
        self.containers.pop()
        self.expecting = self._after_value()
        return True

    def _after_value(self) -> Expecting:
        return ", or end" if self.containers else "done"
