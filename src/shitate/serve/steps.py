"""What a request may ask of each step beyond temperature, top-k and top-p: OpenAI's presence and frequency penalties
and logit bias, the repetition penalty, min-p, min_tokens and ignore_eos of vLLM and llama.cpp, JSON mode
(serve/json_mode.py), and each token's log-probability with its likeliest alternatives.

transformers' continuous batcher hands a logits processor one number per request and no token history; the engine
gives each such request a slot number as that one number, and its processors find the request's `AnswerSteps` by it,
shape the row before the draw and note the word drawn after it. An answer decoded on its own (a seeded one) goes
through the same `AnswerSteps`.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

import torch

from shitate.serve.json_mode import JsonPrefix


@dataclass(frozen=True)
class Shaping:
    """Changes a request makes to each step's logits before the draw; the defaults change nothing."""

    presence_penalty: float = 0.0  # OpenAI's: minus this for every word already in the answer
    frequency_penalty: float = 0.0  # OpenAI's: minus this times how often the word is in the answer
    repetition_penalty: float = 1.0  # transformers' and vLLM's: a word of the prompt or answer has its logit divided
    min_p: float = 0.0  # vLLM's and llama.cpp's: words less likely than min_p times the likeliest are dropped
    logit_bias: tuple[tuple[int, float], ...] = ()  # OpenAI's: (token id, added to its logit)
    min_tokens: int = 0  # the answer does not end before this many tokens
    ignore_eos: bool = False  # the answer ends at max_tokens or a stop string only

    @property
    def active(self) -> bool:
        return self != Shaping()


@dataclass(frozen=True)
class TokenLogprob:
    """A token of an answer (or prompt) with its log-probability and the likeliest words at its place."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = field(default=())  # (token id, log-probability), likeliest first


def shaped(logits: torch.Tensor, shaping: Shaping, context: torch.Tensor, answer_counts: torch.Tensor,
           answer_tokens: int, stop_ids: list[int], temperature: float) -> torch.Tensor:
    """One step's fp32 logits (vocabulary,) after the request's penalties, bias and filters.

    context: a 0/1 mask of the words in the prompt and answer so far (what the repetition penalty reads, as
    transformers' and vLLM's do); answer_counts: how often each word is in the answer (OpenAI's penalties count the
    answer only)."""
    logits = logits.clone()
    if shaping.repetition_penalty != 1.0:
        seen = context.bool()
        penalised = torch.where(logits < 0, logits * shaping.repetition_penalty, logits / shaping.repetition_penalty)
        logits = torch.where(seen, penalised, logits)
    if shaping.frequency_penalty or shaping.presence_penalty:
        logits -= answer_counts * shaping.frequency_penalty + (answer_counts > 0) * shaping.presence_penalty
    for token, bias in shaping.logit_bias:
        logits[token] += bias
    if shaping.ignore_eos or answer_tokens < shaping.min_tokens:
        logits[stop_ids] = -math.inf
    if shaping.min_p > 0 and temperature > 0:
        # p_i / p_max = exp((z_i - z_max) / T) >= min_p, on the logits as the draw divides them by the temperature
        logits = logits.masked_fill(logits < logits.max() + temperature * math.log(shaping.min_p), -math.inf)
    return logits


def token_logprob(logprobs: torch.Tensor, token: int, alternatives: int) -> TokenLogprob:
    """`token`'s entry from one place's log-probabilities (vocabulary,), with the `alternatives` likeliest words."""
    top: tuple[tuple[int, float], ...] = ()
    if alternatives:
        values, words = logprobs.topk(min(alternatives, logprobs.shape[-1]))
        top = tuple(zip(words.tolist(), values.tolist()))
    return TokenLogprob(token, float(logprobs[token]), top)


class TokenSpelling:
    """How a tokenizer's tokens read in a log-probability entry: their bytes (OpenAI's `bytes`) and text."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.special = set(tokenizer.all_special_ids)
        self._spelled: dict[int, bytes] = {}
        backend = getattr(tokenizer, "backend_tokenizer", None)
        decoder = getattr(backend, "decoder", None)
        # GPT-2's byte-level BPE writes each byte as a printable character; this maps them back.
        byte_level = decoder is not None and b'"ByteLevel"' in decoder.__getstate__()
        self.byte_level = _byte_level_alphabet() if byte_level else {}

    def bytes_of(self, token: int) -> bytes:
        """The bytes a token stands for: a byte token of a split Japanese character is that one byte, where
        decoding it alone gives U+FFFD."""
        if token not in self._spelled:  # JSON mode asks for the same likeliest words step after step
            self._spelled[token] = self._bytes(token)
        return self._spelled[token]

    def _bytes(self, token: int) -> bytes:
        piece = self.tokenizer.convert_ids_to_tokens(token)
        if token in self.special:
            return str(piece).encode("utf-8")
        byte_fallback = re.fullmatch(r"<0x([0-9A-Fa-f]{2})>", piece)
        if byte_fallback:  # SentencePiece's byte fallback (Gemma, Llama 2)
            return bytes([int(byte_fallback[1], 16)])
        if self.byte_level and all(character in self.byte_level for character in piece):
            return bytes(self.byte_level[character] for character in piece)
        return str(self.tokenizer.convert_tokens_to_string([piece])).encode("utf-8")

    def characters(self) -> CharacterCount:
        """A running count of the characters these tokens spell, for offsets into their text."""
        return CharacterCount(self)

    def text_of(self, token: int) -> str:
        """A token as text: its bytes read as UTF-8, an incomplete character as U+FFFD."""
        return self.bytes_of(token).decode("utf-8", errors="replace")


class CharacterCount:
    """Where each token's text starts, in characters of the text tokens decode to, counted from their bytes as they
    come: a decode of every prefix cost 0.5 s for a 1,800-token prompt (and grows with its square). A character is
    counted once its last byte is in; a special token spells nothing (decoding skips it)."""

    def __init__(self, spelling: TokenSpelling) -> None:
        self.spelling, self.characters, self.awaited = spelling, 0, 0

    def offset_then_add(self, token: int) -> int:
        """The characters complete before `token`; then `token` is counted."""
        offset = self.characters
        if token not in self.spelling.special:
            for byte in self.spelling.bytes_of(token):
                if byte & 0xC0 == 0x80:  # a continuation byte
                    self.awaited = max(self.awaited - 1, 0)
                    self.characters += self.awaited == 0
                else:  # 0xxxxxxx starts a one-byte character, 110…, 1110…, 11110… longer ones
                    self.awaited = 0 if byte < 0xC0 else 1 if byte < 0xE0 else 2 if byte < 0xF0 else 3
                    self.characters += self.awaited == 0
        return offset


def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level alphabet, character to byte: the printable bytes stand for themselves and the others for
    chr(256 + n) in order. Written out because transformers keeps it only inside its tokenizer converters."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    alphabet = {chr(byte): byte for byte in printable}
    others = (byte for byte in range(256) if byte not in alphabet.values())
    alphabet.update({chr(256 + n): byte for n, byte in enumerate(others)})
    return alphabet


class AnswerSteps:
    """One answer's steps beyond the model's logits: `shape` a step's raw logits as the draw should see them (the
    request's penalties, bias, filters and JSON mode), then `note` the word drawn. The same for an answer decoded on
    its own and for one in the batcher, whose processors call it row by row."""

    def __init__(self, prompt_ids: list[int], shaping: Shaping, logprobs: int | None, json_object: bool,
                 json_schema: dict[str, Any] | None, temperature: float, candidates: int, vocabulary: int, stop_ids: list[int],
                 spelling: TokenSpelling) -> None:
        self.shaping, self.logprobs, self.temperature = shaping, logprobs, temperature
        self.candidates, self.stop_ids, self.spelling = candidates, stop_ids, spelling
        self.answered = 0
        self.entries: list[TokenLogprob] = []  # each word's log-probability, where the request asked for them
        self.json_so_far = JsonPrefix(json_schema) if json_object else None
        self.context = self.answer_counts = torch.zeros(0)
        if shaping.active:
            self.context, self.answer_counts = torch.zeros(vocabulary), torch.zeros(vocabulary)
            self.context[torch.tensor(prompt_ids, dtype=torch.long)] = 1.0
        self._step_logprobs: torch.Tensor | None = None
        self.error: Exception | None = None  # raised in the batcher's thread, reported to the request

    @property
    def json_complete(self) -> bool:
        return self.json_so_far is not None and self.json_so_far.complete

    def shape(self, logits: torch.Tensor) -> torch.Tensor:
        """This step's fp32 logits (vocabulary,) as the draw should see them."""
        if self.logprobs is not None:  # the model's own, before temperature and penalties, as vLLM reports them
            self._step_logprobs = logits.log_softmax(-1)
        if self.shaping.active:
            logits = shaped(logits, self.shaping, self.context, self.answer_counts, self.answered, self.stop_ids,
                            self.temperature)
        if self.json_so_far is None:
            return logits
        kept = torch.full_like(logits, -math.inf)
        if self.json_so_far.complete:  # inside the batcher the answer ends with the end of the turn
            kept[self.stop_ids[0]] = 0.0
        else:
            allowed = self._json_allowed(logits, self.json_so_far)
            kept[allowed] = logits[allowed]
        return kept

    def note(self, token: int) -> None:
        """The word drawn this step."""
        if self._step_logprobs is not None:
            self.entries.append(token_logprob(self._step_logprobs, token, self.logprobs or 0))
            self._step_logprobs = None
        if self.shaping.active:
            self.context[token] = 1.0
            self.answer_counts[token] += 1.0
        if self.json_so_far is not None and not self.json_so_far.complete:
            self.json_so_far.feed(self.spelling.bytes_of(token))
        self.answered += 1

    def _json_allowed(self, logits: torch.Tensor, so_far: JsonPrefix) -> list[int]:
        """The words that keep the answer the beginning of a JSON object: the likeliest one for a greedy answer,
        those among the top-k for a sampled one; wider only where none of those fits (a 262k-word check costs
        about a second)."""
        def fits(token: int) -> bool:
            if token in self.spelling.special or token in self.stop_ids:  # the answer ends when the object closes
                return False
            spelled = self.spelling.bytes_of(token)
            return bool(spelled) and so_far.copy().feed(spelled)

        first = self.candidates if self.temperature > 0 else 64
        for width in (min(first, 256), 4096, logits.shape[-1]):
            values, words = logits.topk(min(width, logits.shape[-1]))
            candidates = words[values > -math.inf].tolist()  # not a word a penalty or min_p has ruled out
            if self.temperature <= 0:
                likeliest = next((token for token in candidates if fits(token)), None)
                if likeliest is not None:
                    return [likeliest]
                continue
            allowed = [token for token in candidates if fits(token)]
            if allowed:
                return allowed
        raise RuntimeError("no word of the vocabulary continues the JSON answer")
