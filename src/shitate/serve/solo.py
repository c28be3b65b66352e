"""What a request decoded on its own gets that the batch cannot give it: OpenAI's presence and frequency penalties
and logit bias, the repetition penalty, min-p, min_tokens and ignore_eos of vLLM and llama.cpp, and each token's
log-probability with its likeliest alternatives.

transformers' continuous batcher hands a logits processor one number per request and no token history, so none of
these fit there; a request that asks for one is decoded alone beside the batch (`Engine._decode_solo`), and each
step's logits pass through `shaped` before the draw.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

import torch


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

    def text_of(self, token: int) -> str:
        """A token as text: its bytes read as UTF-8, an incomplete character as U+FFFD."""
        return self.bytes_of(token).decode("utf-8", errors="replace")


def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level alphabet, character to byte: the printable bytes stand for themselves and the others for
    chr(256 + n) in order. Written out because transformers keeps it only inside its tokenizer converters."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    alphabet = {chr(byte): byte for byte in printable}
    others = (byte for byte in range(256) if byte not in alphabet.values())
    alphabet.update({chr(256 + n): byte for n, byte in enumerate(others)})
    return alphabet
