"""One model answering many requests at once: continuous batching through transformers.

A request joins the running batch at the next decoding step and leaves when it stops, so a
second user does not wait for the first one's answer. The batching itself is transformers'
`ContinuousBatchingManager` (paged KV cache, a background decoding thread); what is ours is
what an OpenAI-style server needs around it: the model's template and stop tokens, per-request
sampling settings, stop strings, and text that is released only once it is final (a Japanese
character split across byte tokens, or the start of a stop string, is held back); and what the
batcher has no per-request place for — penalties, log-probabilities, JSON mode (serve/steps.py) —
through processors of ours that find each request's state by a slot number it carries. A seeded
request is decoded on its own beside the batch.

Nothing here mutates the shared model or tokenizer per request.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import itertools
import math
import threading
import time
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from typing import Any

from shitate.config import GenerateSpec
from shitate.data.templates import stop_token_ids
from shitate.errors import ShitateError
from shitate.models.attention import use_soft_capped_paged_attention
from shitate.models.inference import LoadedModel, sampling_top_k, with_system
from shitate.serve.steps import AnswerSteps, Shaping, TokenLogprob, TokenSpelling, token_logprob

PAGE_TOKENS = 256


class EngineFailed(ShitateError):
    """The background decoding loop is gone; no request can be answered."""


@dataclass(frozen=True)
class Sampling:
    """What one request asks of the decoder."""

    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int | None = None  # sampled answers draw among this many likeliest words: None the model's, 0 all of them
    stop: tuple[str, ...] = ()
    seed: int | None = None  # a sampled answer with a seed is drawn from its own generator: reproducible
    stop_token_ids: tuple[int, ...] = ()  # vLLM's: words that end the answer besides the model's own end of turn
    logprobs: int | None = None  # each answer token's log-probability and this many likeliest alternatives
    shaping: Shaping = Shaping()
    json_object: bool = False  # JSON mode: the answer is one JSON object (serve/json_mode.py)...
    json_schema: dict[str, Any] | None = None  # ...that fits this schema (structured outputs)

    @property
    def seeded(self) -> bool:
        return self.seed is not None and self.temperature > 0

    @property
    def steps_of_its_own(self) -> bool:
        """Whether the request's steps need more than the batcher's own sampling (serve/steps.AnswerSteps)."""
        return self.logprobs is not None or self.shaping.active or self.json_object


@dataclass
class Piece:
    """Text released for one answer since the last piece, and why it ended (when it has)."""

    text: str
    finish_reason: str | None = None  # "stop" (end of turn, EOS or a stop string) or "length"
    completion_tokens: int = 0
    logprobs: list[TokenLogprob] = field(default_factory=list)  # of the tokens whose text this piece releases


@dataclass
class _Decoded:
    """Incremental detokenisation of one answer: the text released so far."""

    released: str = ""
    tokens_released: int = 0


class _Lane:
    """One continuous batcher over the shared model: greedy, or sampling with per-request temperature, top-k (the
    model's own where a request names none, as `generate` and `chat` sample) and top-p.

    Two lanes because the batcher applies its sampling to every request of a step, which greedy requests should
    not pay for."""

    def __init__(self, engine_name: str, model: Any, sampled: bool, stop_ids: list[int], pad: int, max_new_tokens: int,
                 cache_tokens: int, max_requests: int, top_k: int, answer_steps: dict[int, AnswerSteps]) -> None:
        from transformers import ContinuousBatchingConfig, GenerationConfig

        self.name = f"{engine_name} ({'sampled' if sampled else 'greedy'})"
        # Temperature and top-p are set away from 1.0 so transformers builds their per-request processors; top_k
        # (the requests' default) is always set, for the same reason.
        config = (GenerationConfig(do_sample=True, temperature=0.7, top_p=0.9, top_k=top_k,
                                   max_new_tokens=max_new_tokens, eos_token_id=stop_ids, pad_token_id=pad) if sampled else
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
        # Whether requests carrying a slot have their steps shaped here (else they are decoded on their own).
        self.takes_slots = sampled and _draw_among_top_k_in(self.manager, answer_steps)
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


def _draw_among_top_k_in(manager: Any, answer_steps: dict[int, AnswerSteps]) -> bool:
    """Make the batcher's top-k and top-p one draw among each request's top k words
    (models/inference.draw_among_top_k), taken by its greedy step, and let requests that carry a slot number have
    their steps shaped and noted by their `AnswerSteps` in `answer_steps`. transformers' own draw sorts the whole
    vocabulary for each request and then draws over all of it: 165 ms a step for 8 requests over Gemma 3's 262k words
    on a 2-core Xeon, against 5 ms, where a greedy step of the model itself took about 95. Its per-request temperature
    stays. Reaches into the batcher before it starts; a transformers release laid out otherwise keeps its own sampling
    (False: no slots)."""
    import torch
    from transformers import LogitsProcessorList

    from shitate.models.inference import draw_among_top_k

    try:
        from transformers.generation.continuous_batching import cb_logits_processors as cb
    except ImportError:  # a release before per-request processors
        return False

    # The batcher hands each processor one number per request, so the per-request top-k keeps its own processor,
    # which notes the step's numbers for the draw instead of sorting the vocabulary.
    class NoteTopK(cb.ContinuousBatchingTopKLogitsWarper):
        def __init__(self, replaced: Any) -> None:
            self.top_k, self.filter_value = replaced.top_k, replaced.filter_value
            self.min_tokens_to_keep = replaced.min_tokens_to_keep
            self.rows: Any = None

        def __call__(self, scores: Any, tensor_arg: Any) -> Any:
            self.rows = tensor_arg[: scores.size(0)].clone()
            return scores

    class DrawAmongTopK(cb.ContinuousBatchingTopPLogitsWarper):  # the per-request top-p, read as transformers reads it
        def __init__(self, replaced: Any, top_k: NoteTopK) -> None:
            self.top_p, self.filter_value = replaced.top_p, replaced.filter_value
            self.min_tokens_to_keep, self.top_k = replaced.min_tokens_to_keep, top_k

        def __call__(self, scores: Any, tensor_arg: Any) -> Any:
            top_p = tensor_arg[: scores.size(0)].view(dtype=torch.float32)
            # scores come divided by each request's temperature
            chosen = draw_among_top_k(scores, 1.0, self.top_k.rows, top_p)
            return scores.fill_(-math.inf).scatter_(-1, chosen.unsqueeze(-1), 0.0)

    processors = manager.logit_processor
    listed = list(processors.logits_processor)
    top_k = [p for p in listed if isinstance(p, cb.ContinuousBatchingTopKLogitsWarper)]
    top_p = [p for p in listed if isinstance(p, cb.ContinuousBatchingTopPLogitsWarper)]
    others = [p for p in listed if p not in top_k + top_p]
    if (len(top_k) != 1 or len(top_p) != 1
            or not all(isinstance(p, cb.ContinuousBatchingTemperatureLogitsWarper) for p in others)
            or not hasattr(processors, "_retrieve_processors_kwargs")):
        return False
    noted = NoteTopK(top_k[0])
    shape_rows, note_drawn = _slot_processors(answer_steps)
    processors.logits_processor = LogitsProcessorList([shape_rows, *others, noted, DrawAmongTopK(top_p[0], noted),
                                                       note_drawn])
    processors.tensors_required = len(others) + 4
    processors._retrieve_processors_kwargs()
    manager.generation_config.do_sample = False  # the batcher's step takes the one word left
    return True


def _slot_processors(answer_steps: dict[int, AnswerSteps]) -> tuple[Any, Any]:
    """The batcher's first and last processor for requests that carry a slot: the row shaped by the request's
    AnswerSteps before the temperature, and the word drawn noted by them after the draw."""
    import torch
    from transformers.generation.continuous_batching import cb_logits_processors as cb

    class ShapeRows(cb.ContinuousBatchingLogitsProcessor):
        """Each row whose request carries a slot, as its AnswerSteps shapes it (before the temperature)."""

        supported_kwargs: dict[str, type] = {"shitate_slot": int}
        ignored_kwargs: tuple[str, ...] = ()

        def fill_defaults(self, int32_tensor: Any) -> None:
            int32_tensor.fill_(-1)

        def prepare_tensor_args(self, requests_with_new_token: list[Any]) -> Any:
            # the slot travels in the batch itself, so it is right for the step it was prepared for
            return torch.tensor([r.state.logit_processor_kwargs.get("shitate_slot", -1) for r in requests_with_new_token],
                                dtype=torch.int32)

        def rows(self, scores: Any, tensor_arg: Any) -> list[tuple[int, AnswerSteps]]:
            slots = tensor_arg[: scores.size(0)].tolist()
            return [(row, answer_steps[slot]) for row, slot in enumerate(slots) if slot in answer_steps]

        def __call__(self, scores: Any, tensor_arg: Any) -> Any:
            for row, steps in self.rows(scores, tensor_arg):
                try:
                    scores[row] = steps.shape(scores[row].float().cpu()).to(scores.device)
                except Exception as err:  # that request fails (Engine.answer raises it); the batcher goes on
                    steps.error = err
            return scores

    class NoteDrawn(ShapeRows):
        """The word drawn for each such row (the one the draw left), noted by its AnswerSteps."""

        def __call__(self, scores: Any, tensor_arg: Any) -> Any:
            for row, steps in self.rows(scores, tensor_arg):
                try:
                    steps.note(int(scores[row].argmax()))
                except Exception as err:
                    steps.error = err
            return scores

    return ShapeRows(), NoteDrawn()


class Engine:
    """A loaded model behind continuous batchers. `answer` is an async iterator of text pieces."""

    def __init__(self, loaded: LoadedModel, name: str, defaults: GenerateSpec | None = None,
                 cache_tokens: int = 32768, max_requests: int = 32) -> None:
        self.loaded, self.name = loaded, name
        self.defaults = defaults or GenerateSpec(temperature=1.0, max_new_tokens=256)
        tokenizer = loaded.tokenizer
        self.stop_ids = stop_token_ids(tokenizer, loaded.template)
        text_config = loaded.model.config.get_text_config()  # a multimodal checkpoint's language model
        self.context_length = int(getattr(text_config, "max_position_embeddings", 0) or 8192)
        self._model = loaded.model.get_base_model() if hasattr(loaded.model, "get_base_model") else loaded.model
        use_soft_capped_paged_attention(self._model)
        self._causal_settings = _causal_settings(self._model)
        pad = tokenizer.pad_token_id
        self.top_k = sampling_top_k(loaded.model)  # sampled answers keep the model's top-k, as generate's do
        self.vocabulary = int(text_config.vocab_size)
        self.spelling = TokenSpelling(tokenizer)  # how log-probability entries name their tokens
        # The steps of requests that shape them, by the slot number each carries into the batcher.
        self._answer_steps: dict[int, AnswerSteps] = {}
        self._slots = itertools.count()
        self._lane_settings = (self.stop_ids, pad, self.defaults.max_new_tokens, cache_tokens, max_requests,
                               self.top_k_of(Sampling(max_tokens=1)), self._answer_steps)
        self._lanes: dict[bool, _Lane] = {False: _Lane(name, self._model, False, *self._lane_settings)}
        self._ids = itertools.count()
        self.active: set[str] = set()  # requests in a batcher now
        # Held by a seeded request's step (the batchers paused meanwhile) and by a batcher's start, so that no
        # batcher runs the model during such a step.
        self._solo = threading.Lock()
        from transformers import ContinuousBatchingManager

        # Releases without the batcher's pause answer a seeded request in the batch (not reproducible, as before).
        self._can_pause = hasattr(ContinuousBatchingManager, "pause")
        # transformers renamed the forward's cache argument; the old name warns of its removal.
        self._cache_argument = "cache" if "cache" in inspect.signature(self._model.forward).parameters \
            else "past_key_values"

    def _lane(self, sampled: bool) -> _Lane:
        if sampled not in self._lanes:  # the first sampled request starts its batcher (a second or so)
            with self._solo:
                self._lanes[sampled] = _Lane(self.name, self._model, sampled, *self._lane_settings)
        return self._lanes[sampled]

    def close(self) -> None:
        for lane in self._lanes.values():
            lane.manager.stop(block=True)

    # --- prompts -------------------------------------------------------------------------------------------------
    def chat_prompt(self, messages: list[dict[str, str]]) -> list[int]:
        """The prompt's tokens; a run folder's system prompt goes first when the request has none (as an Ollama
        Modelfile's SYSTEM does: the run was trained with it, and answers without it drift from what it learned)."""
        text = self.loaded.template(with_system(messages, self.loaded.system), add_generation_prompt=True)
        return self.loaded.tokenizer(text, add_special_tokens=False)["input_ids"]

    def text_prompt(self, prompt: str) -> list[int]:
        """A plain continuation, as a base model sees it: BOS first, no template."""
        bos = self.loaded.tokenizer.bos_token or ""
        return self.loaded.tokenizer(bos + prompt, add_special_tokens=False)["input_ids"]

    # --- answering -------------------------------------------------------------------------------------------------
    async def answer(self, prompt_ids: list[int], sampling: Sampling) -> AsyncGenerator[Piece, None]:
        """Pieces of one answer as the batcher writes it; leaving the iterator early cancels the request at once."""
        steps = self._steps(prompt_ids, sampling) if sampling.steps_of_its_own else None
        # Without the batcher's pause a seeded request shares the batch (not reproducible, as before 5.x's pause).
        if (sampling.seeded and self._can_pause) or (steps is not None and not self._lane(True).takes_slots):
            async for piece in self._solo_answer(prompt_ids, sampling, steps):
                yield piece
            return
        outputs: asyncio.Queue[Any] = asyncio.Queue()
        request_id = f"{self.name}-{next(self._ids)}"
        lane = self._lane(sampling.temperature > 0 or steps is not None)
        lane.check_alive()
        lane.manager.register_result_handler(request_id, outputs.put_nowait)
        extra: dict[str, Any] = {"temperature": float(sampling.temperature), "top_p": float(sampling.top_p),
                                 "top_k": self.top_k_of(sampling)} if sampling.temperature > 0 else {}
        slot = None
        if steps is not None:
            slot = next(self._slots) % 2**31  # an int32 in the batcher's tensors
            self._answer_steps[slot] = steps
            # a greedy answer with steps of its own is the likeliest of the shaped words: drawn among the top one
            extra = extra or {"temperature": 1.0, "top_p": 1.0, "top_k": 1}
            extra["shitate_slot"] = slot
        if lane.manager.add_request(prompt_ids, request_id=request_id, max_new_tokens=sampling.max_tokens,
                                    streaming=True, eos_token_id=self.ends(sampling), **extra) is None:
            if slot is not None:
                self._answer_steps.pop(slot)
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
                if steps is not None and steps.error is not None:
                    raise RuntimeError(f"generation failed: {steps.error}") from steps.error
                finished = output.is_finished()
                piece = self._release(decoded, output.generated_tokens, sampling, finished,
                                      steps.entries if steps is not None and sampling.logprobs is not None else None)
                if piece.finish_reason is not None:
                    finished = True
                if piece.text or piece.finish_reason:
                    yield piece
        finally:
            if not finished:  # the client left, or a stop string ended the answer early: free the slot now
                lane.manager.cancel_request(request_id)
            self.active.discard(request_id)
            if slot is not None:
                self._answer_steps.pop(slot, None)

    def _steps(self, prompt_ids: list[int], sampling: Sampling) -> AnswerSteps:
        return AnswerSteps(prompt_ids, sampling.shaping, sampling.logprobs, sampling.json_object, sampling.json_schema,
                           sampling.temperature,
                           self.top_k_of(sampling), self.vocabulary, self.ends(sampling), self.spelling)

    def ends(self, sampling: Sampling) -> list[int]:
        """The words that end this request's answer."""
        return self.stop_ids + [t for t in sampling.stop_token_ids if t not in self.stop_ids]

    def _release(self, decoded: _Decoded, tokens: list[int], sampling: Sampling, finished: bool,
                 logprobs: list[TokenLogprob] | None = None) -> Piece:
        """The new final text of an answer whose tokens so far are `tokens` (with their log-probabilities, where the
        request asked for them: those of the tokens the new text covers go with it)."""
        ended_by_token = bool(tokens) and tokens[-1] in self.ends(sampling)
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
        covered: list[TokenLogprob] = []
        if logprobs is not None:
            start = decoded.tokens_released
            decoded.tokens_released = self._tokens_within(body, len(decoded.released), start)
            covered = logprobs[start:decoded.tokens_released]
        return Piece(new, reason, len(tokens), covered)

    def _tokens_within(self, body: list[int], characters: int, start: int) -> int:
        """How many of the answer's first tokens decode within its first `characters` characters (from `start`, the
        count already known to): a token whose text is held back, or cut off by a stop string, is not yet one."""
        count = start
        while count < len(body) and len(self.loaded.tokenizer.decode(body[:count + 1],
                                                                     skip_special_tokens=True)) <= characters:
            count += 1
        return count

    async def _solo_answer(self, prompt_ids: list[int], sampling: Sampling,
                           steps: AnswerSteps | None) -> AsyncGenerator[Piece, None]:
        """An answer decoded on its own beside the batchers: a seeded sample (with steps of its own where the
        request asks for them: serve/steps.py), or any such request where the batcher takes no slots.

        transformers' batcher draws every request's tokens from one generator, so what a request gets depends on
        who else is being answered; OpenAI's `seed` promises the same answer for the same request. Such a request
        is decoded alone (KV cache, one token a step) with a generator of its own, in a worker thread, and each of
        its steps runs while the batchers are paused: a forward pass beside a running batcher's came out different
        (transformers' batcher is not written to share the model with other threads but through its pause). The
        request does not share the batch, and the batch waits for each of its steps: the price of being
        reproducible, and of per-request settings the batcher has no place for."""
        if not self._can_pause:
            raise EngineFailed(f"{self.name}: log-probabilities, penalties and JSON mode need a transformers release "
                               "whose batcher can pause (ContinuousBatchingManager.pause); upgrade transformers, or "
                               "leave them out.")
        loop = asyncio.get_running_loop()
        outputs: asyncio.Queue[tuple[list[int], bool] | BaseException] = asyncio.Queue()
        cancelled = threading.Event()

        def emit(item: tuple[list[int], bool] | BaseException) -> None:
            loop.call_soon_threadsafe(outputs.put_nowait, item)

        worker = loop.run_in_executor(None, self._decode_solo, prompt_ids, sampling, steps, emit, cancelled)
        decoded, finished = _Decoded(), False
        try:
            while not finished:
                item = await outputs.get()
                if isinstance(item, BaseException):
                    raise RuntimeError(f"generation failed: {item}") from item
                tokens, finished = item
                piece = self._release(decoded, tokens, sampling, finished,
                                      steps.entries if steps is not None and sampling.logprobs is not None else None)
                finished = finished or piece.finish_reason is not None
                if piece.text or piece.finish_reason:
                    yield piece
        finally:
            cancelled.set()  # the client left, or a stop string ended the answer: the worker stops at its next step
            await worker

    @contextlib.contextmanager
    def _alone(self) -> Any:
        """The model to this thread alone: every batcher paused, no batcher starting, and the model's configuration
        as it was loaded.

        transformers sets `config.is_causal` for the length of each forward and then puts the old value back; the
        forwards of the greedy and the sampled batcher overlap, each puts back the value the other had set, and the
        configuration was left with `is_causal = False` — after which a forward outside the batchers (they pass
        is_causal themselves) attended to the whole prompt both ways and answered garbage (a seeded or scored
        request after greedy and sampled ones had run together)."""
        with self._solo, contextlib.ExitStack() as paused:
            for lane in list(self._lanes.values()):
                paused.enter_context(lane.manager.pause())
            _restore_causal_settings(self._causal_settings)
            yield

    def _decode_solo(self, prompt_ids: list[int], sampling: Sampling, steps: AnswerSteps | None, emit: Any,
                     cancelled: threading.Event) -> None:
        import torch
        from transformers import DynamicCache

        try:
            generator = torch.Generator()  # on the CPU: the same draws on any device
            if sampling.seed is None:
                generator.seed()
            else:
                generator.manual_seed(sampling.seed)
            device = self._model.device
            cache = DynamicCache(config=self._model.config)
            step_ids, tokens = torch.tensor([prompt_ids], device=device), list[int]()
            with torch.inference_mode():
                while len(tokens) < sampling.max_tokens and not cancelled.is_set():
                    with self._alone():
                        logits = self._model(input_ids=step_ids, use_cache=True, logits_to_keep=1,
                                             **{self._cache_argument: cache}).logits[0, -1]
                    logits = logits.float().cpu()[: self.vocabulary]
                    if steps is not None:
                        logits = steps.shape(logits)
                    if sampling.temperature > 0:
                        token = draw_token(logits, sampling.temperature, sampling.top_p, generator,
                                           self.top_k_of(sampling))
                    else:
                        token = int(logits.argmax())
                    if steps is not None:
                        steps.note(token)
                    tokens.append(token)
                    done = ((token in self.ends(sampling) and not sampling.shaping.ignore_eos)
                            or len(tokens) == sampling.max_tokens or (steps is not None and steps.json_complete))
                    emit((list(tokens), done))
                    if done:
                        return
                    step_ids = torch.tensor([[token]], device=device)
        except Exception as err:  # reported to the request that asked; the server goes on
            emit(err)

    async def prompt_logprobs(self, prompt_ids: list[int], alternatives: int) -> list[TokenLogprob | None]:
        """Each prompt token's log-probability after the tokens before it (None for the first, which follows
        nothing), with the `alternatives` likeliest words at its place: what /v1/completions' echo with logprobs
        returns, and what evaluation harnesses score answers by."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(None, self._score_prompt, prompt_ids, alternatives)

    def _score_prompt(self, prompt_ids: list[int], alternatives: int) -> list[TokenLogprob | None]:
        import torch

        from shitate.models.logprobs import block_logits, decoder_states, output_softcap

        entries: list[TokenLogprob | None] = [None]
        with torch.inference_mode():
            with self._alone():
                base, states = decoder_states(self._model, torch.tensor([prompt_ids], device=self._model.device))
            weight, softcap = base.get_output_embeddings().weight, output_softcap(base)
            # a few rows at a time: a row's logits are the whole vocabulary (1 MB in fp32 for Gemma 3)
            for start in range(0, len(prompt_ids) - 1, 64):
                rows = states[0, start:start + 64]
                logits = block_logits(rows, weight, softcap)[:, : self.vocabulary]
                for row, place in zip(logits.log_softmax(-1).cpu(), range(start + 1, len(prompt_ids))):
                    entries.append(token_logprob(row, prompt_ids[place], alternatives))
        return entries

    def top_k_of(self, sampling: Sampling) -> int:
        """How many of the likeliest words a sampled answer draws among: the request's top-k, else the model's; the
        whole vocabulary where the one that counts is 0 (or the model keeps none)."""
        wanted = self.top_k if sampling.top_k is None else sampling.top_k
        return min(wanted or self.vocabulary, self.vocabulary)

    async def complete(self, prompt_ids: list[int], sampling: Sampling) -> Piece:
        """A whole answer at once."""
        parts, logprobs, last = [], [], Piece("")
        async for piece in self.answer(prompt_ids, sampling):
            parts.append(piece.text)
            logprobs += piece.logprobs
            last = piece
        return Piece("".join(parts), last.finish_reason or "length", last.completion_tokens, logprobs)


_UNSET = object()


def _causal_settings(model: Any) -> list[tuple[Any, Any]]:
    """Each configuration in the model (a multimodal one has a text configuration of its own) with its `is_causal` as
    loaded (`_UNSET` where it has none)."""
    configs = {id(module.config): module.config for module in model.modules() if hasattr(module, "config")}
    return [(config, vars(config).get("is_causal", _UNSET)) for config in configs.values()]


def _restore_causal_settings(settings: list[tuple[Any, Any]]) -> None:
    for config, value in settings:
        if value is _UNSET:
            vars(config).pop("is_causal", None)
        else:
            config.is_causal = value


def draw_token(logits: Any, temperature: float, top_p: float, generator: Any, top_k: int | None = None) -> int:
    """One token from softmax(logits / temperature), within the top_k likeliest (all where None) and the smallest set
    of tokens whose probability reaches top_p (nucleus sampling, as transformers' TopPLogitsWarper keeps it), drawn
    with `generator` (a CPU one)."""
    from shitate.models.inference import draw_among_top_k

    logits = logits.float().cpu().unsqueeze(0)
    return int(draw_among_top_k(logits, temperature, top_k or logits.shape[-1], top_p, generator)[0])


def open_engines(references: list[str], dtype: Any = None, cache_tokens: int = 32768,
                 max_requests: int = 32) -> dict[str, Engine]:
    """Engines by served name: `NAME=MODEL`, or MODEL alone (named after its folder or file). A run folder's answers
    default to its recipe's `generate:` settings; anything else to OpenAI's (temperature 1)."""
    from pathlib import Path

    from shitate.errors import ConfigError
    from shitate.models.inference import load_for_inference
    from shitate.progress import say
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
            # the recipe's answer settings, the repetition penalty included: the server answers as compare and eval do
            defaults = GenerateSpec(**{k: v for k, v in saved.items()
                                       if k in ("temperature", "top_p", "max_new_tokens", "repetition_penalty")})
            if defaults.repetition_penalty != 1.0:
                say(f"{name}: answers with the recipe's repetition penalty {defaults.repetition_penalty} unless a "
                    "request sets its own (\"repetition_penalty\": 1.0 for none).")
        engines[name] = Engine(loaded, name, defaults, cache_tokens, max_requests)
    return engines
