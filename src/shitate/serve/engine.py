"""One model answering many requests at once: continuous batching through transformers.

A request joins the running batch at the next decoding step and leaves when it stops, so a
second user does not wait for the first one's answer. The batching itself is transformers'
`ContinuousBatchingManager` (paged KV cache, a background decoding thread); what is ours is
what an OpenAI-style server needs around it: the model's template and stop tokens, per-request
sampling settings, stop strings, and text that is released only once it is final (a Japanese
character split across byte tokens, or the start of a stop string, is held back).

Nothing here mutates the shared model or tokenizer per request.
"""

from __future__ import annotations

import asyncio
import inspect
import itertools
import time
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Any

from shitate.config import GenerateSpec
from shitate.data.templates import stop_token_ids
from shitate.errors import ShitateError
from shitate.models.inference import LoadedModel

PAGE_TOKENS = 256


class EngineFailed(ShitateError):
    """The background decoding loop is gone; no request can be answered."""


@dataclass(frozen=True)
class Sampling:
    """What one request asks of the decoder."""

    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()


@dataclass
class Piece:
    """Text released for one answer since the last piece, and why it ended (when it has)."""

    text: str
    finish_reason: str | None = None  # "stop" (end of turn, EOS or a stop string) or "length"
    completion_tokens: int = 0


@dataclass
class _Decoded:
    """Incremental detokenisation of one answer: the text released so far."""

    released: str = ""


class _Lane:
    """One continuous batcher over the shared model: greedy, or sampling with per-request temperature and top-p.

    Two lanes because transformers' batcher applies its sampling to every request of a step: on a CPU, top-p's
    sort over a 262k vocabulary and the multinomial draw cost more than the model's own forward, which greedy
    requests should not pay."""

    def __init__(self, engine_name: str, model: Any, sampled: bool, stop_ids: list[int], pad: int, max_new_tokens: int,
                 cache_tokens: int, max_requests: int) -> None:
        from transformers import ContinuousBatchingConfig, GenerationConfig

        self.name = f"{engine_name} ({'sampled' if sampled else 'greedy'})"
        # Temperature and top-p are set away from 1.0 so transformers builds their per-request processors.
        config = (GenerationConfig(do_sample=True, temperature=0.7, top_p=0.9, max_new_tokens=max_new_tokens,
                                   eos_token_id=stop_ids, pad_token_id=pad) if sampled else
                  GenerationConfig(do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=stop_ids, pad_token_id=pad))
        # The KV cache is sized here. Left to itself transformers takes most of the free memory (on a CPU, of the
        # machine's RAM, for every batcher), and where attention runs with dense masks (CPUs) their size grows
        # with the cache times the tokens of one step, so both are kept moderate.
        wanted: dict[str, Any] = {"per_request_processors": sampled, "max_requests_per_batch": max_requests,
                                  "max_batch_tokens": 512, "page_size": PAGE_TOKENS,
                                  "num_blocks": max(1, cache_tokens // PAGE_TOKENS)}
        # Settings this transformers release does not know (page_size arrived after 5.17) keep its defaults.
        accepted = inspect.signature(ContinuousBatchingConfig.__init__).parameters
        batching = ContinuousBatchingConfig(**{k: v for k, v in wanted.items() if k in accepted})
        self.manager = model.init_continuous_batching(generation_config=config, continuous_batching_config=batching)
        self.manager.start()
        self._wait_until_ready()

    def _wait_until_ready(self, seconds: float = 120.0) -> None:
        """The batcher builds its cache in its own thread: surface a failure there now, not at the first request."""
        deadline = time.monotonic() + seconds
        while self.manager.batch_processor is None and time.monotonic() < deadline:
            if self.manager.background_thread_status.fatal_error is not None or not self._alive():
                break
            time.sleep(0.05)
        self.check_alive()

    def _alive(self) -> bool:
        thread = self.manager._generation_thread
        return thread is not None and thread.is_alive()

    def check_alive(self) -> None:
        error = self.manager.background_thread_status.fatal_error
        if error is not None or not self._alive():
            raise EngineFailed(f"{self.name}: the decoding loop stopped ({error or 'no reason given'}). Restart "
                               "shitate serve; if it names memory, lower --cache-tokens.")


class Engine:
    """A loaded model behind continuous batchers. `answer` is an async iterator of text pieces."""

    def __init__(self, loaded: LoadedModel, name: str, defaults: GenerateSpec | None = None,
                 cache_tokens: int = 32768, max_requests: int = 32) -> None:
        self.loaded, self.name = loaded, name
        self.defaults = defaults or GenerateSpec(temperature=1.0, max_new_tokens=256)
        tokenizer = loaded.tokenizer
        self.stop_ids = stop_token_ids(tokenizer, loaded.template)
        self.context_length = int(getattr(loaded.model.config, "max_position_embeddings", 0) or 8192)
        self._model = loaded.model.get_base_model() if hasattr(loaded.model, "get_base_model") else loaded.model
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self._lane_settings = (self.stop_ids, pad, self.defaults.max_new_tokens, cache_tokens, max_requests)
        self._lanes: dict[bool, _Lane] = {False: _Lane(name, self._model, False, *self._lane_settings)}
        self._ids = itertools.count()
        self.active: set[str] = set()  # requests in a batcher now

    def _lane(self, sampled: bool) -> _Lane:
        if sampled not in self._lanes:  # the first sampled request starts its batcher (a second or so)
            self._lanes[sampled] = _Lane(self.name, self._model, sampled, *self._lane_settings)
        return self._lanes[sampled]

    def close(self) -> None:
        for lane in self._lanes.values():
            lane.manager.stop(block=True)

    # --- prompts -------------------------------------------------------------------------------------------------
    def chat_prompt(self, messages: list[dict[str, str]]) -> list[int]:
        text = self.loaded.template(messages, add_generation_prompt=True)
        return self.loaded.tokenizer(text, add_special_tokens=False)["input_ids"]

    def text_prompt(self, prompt: str) -> list[int]:
        """A plain continuation, as a base model sees it: BOS first, no template."""
        bos = self.loaded.tokenizer.bos_token or ""
        return self.loaded.tokenizer(bos + prompt, add_special_tokens=False)["input_ids"]

    # --- answering -------------------------------------------------------------------------------------------------
    async def answer(self, prompt_ids: list[int], sampling: Sampling) -> AsyncGenerator[Piece, None]:
        """Pieces of one answer as the batcher writes it; leaving the iterator early cancels the request at once."""
        outputs: asyncio.Queue[Any] = asyncio.Queue()
        request_id = f"{self.name}-{next(self._ids)}"
        lane = self._lane(sampling.temperature > 0)
        lane.check_alive()
        lane.manager.register_result_handler(request_id, outputs.put_nowait)
        extra = {"temperature": float(sampling.temperature), "top_p": float(sampling.top_p)} \
            if sampling.temperature > 0 else {}
        if lane.manager.add_request(prompt_ids, request_id=request_id, max_new_tokens=sampling.max_tokens,
                                    streaming=True, eos_token_id=self.stop_ids, **extra) is None:
            raise EngineFailed(f"{lane.name}: the batcher is shutting down and took no new request.")
        decoded, finished = _Decoded(), False
        self.active.add(request_id)
        try:
            while not finished:
                try:
                    output = await asyncio.wait_for(outputs.get(), timeout=5.0)
                except asyncio.TimeoutError:
                    lane.check_alive()  # a long prompt's prefill, or a dead loop that would never answer
                    continue
                if output.error:
                    raise RuntimeError(f"generation failed: {output.error}")
                finished = output.is_finished()
                piece = self._release(decoded, output.generated_tokens, sampling, finished)
                if piece.finish_reason is not None:
                    finished = True
                if piece.text or piece.finish_reason:
                    yield piece
        finally:
            if not finished:  # the client left, or a stop string ended the answer early: free the slot now
                lane.manager.cancel_request(request_id)
            self.active.discard(request_id)

    def _release(self, decoded: _Decoded, tokens: list[int], sampling: Sampling, finished: bool) -> Piece:
        """The new final text of an answer whose tokens so far are `tokens`."""
        ended_by_token = bool(tokens) and tokens[-1] in self.stop_ids
        body = tokens[:-1] if ended_by_token else tokens
        text = self.loaded.tokenizer.decode(body, skip_special_tokens=True)
        reason = None
        cut = min((i for i in (text.find(s) for s in sampling.stop) if i >= 0), default=-1)
        if cut >= 0:
            text, reason = text[:cut], "stop"
        elif finished or ended_by_token:
            reason = "stop" if ended_by_token or len(tokens) < sampling.max_tokens else "length"
        else:
            # Hold back an incomplete character (a byte token of a multi-byte one decodes to U+FFFD) and any tail
            # that could still become a stop string.
            text = text.rstrip("\ufffd")
            hold = max((k for s in sampling.stop for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
            text = text[:len(text) - hold]
        new = text[len(decoded.released):] if text.startswith(decoded.released) else ""
        decoded.released += new
        return Piece(new, reason, len(tokens))

    async def complete(self, prompt_ids: list[int], sampling: Sampling) -> Piece:
        """A whole answer at once."""
        parts, last = [], Piece("")
        async for piece in self.answer(prompt_ids, sampling):
            parts.append(piece.text)
            last = piece
        return Piece("".join(parts), last.finish_reason or "length", last.completion_tokens)


def open_engines(references: list[str], dtype: Any = None, cache_tokens: int = 32768,
                 max_requests: int = 32) -> dict[str, Engine]:
    """Engines by served name: `NAME=MODEL`, or MODEL alone (named after its folder or file). A run folder's answers
    default to its recipe's `generate:` settings; anything else to OpenAI's (temperature 1)."""
    from pathlib import Path

    from shitate.errors import ConfigError
    from shitate.models.inference import load_for_inference
    from shitate.runs import RunFolder

    engines: dict[str, Engine] = {}
    for reference in references:
        name, _, model = reference.rpartition("=") if "=" in reference else ("", "", reference)
        name = name or Path(model.rstrip("/")).name.removesuffix(".gguf") or model
        if name in engines:
            raise ConfigError(f"two models are served as {name!r}; name them: shitate serve a={model} b=…")
        loaded = load_for_inference(model, dtype=dtype)
        defaults = GenerateSpec(temperature=1.0, max_new_tokens=256)
        if loaded.source.run is not None:
            saved = RunFolder(loaded.source.run).recipe_setting("generate", {}) or {}
            defaults = GenerateSpec(**{k: v for k, v in saved.items() if k in ("temperature", "top_p", "max_new_tokens")})
        engines[name] = Engine(loaded, name, defaults, cache_tokens, max_requests)
    return engines
