"""Inference shared by `generate`, `chat`, `compare` and `eval`: batched generation that stops at the template's
end marker, streaming, and answer log-likelihoods for multiple choice."""

from __future__ import annotations

import atexit
import contextlib
import math
import traceback
from collections.abc import Generator, Iterator
from dataclasses import dataclass
from threading import Condition, Event, Thread, current_thread
from typing import Any

import torch

from shitate.config import GenerateSpec
from shitate.data.templates import ChatTemplate, get_template, stop_token_ids
from shitate.errors import ConfigError, StoppedAtExit
from shitate.models.load import ModelSource, learned_position_limit, load_model, load_tokenizer, resolve
from shitate.models.logprobs import output_softcap
from shitate.models.precision import bf16_supported, generating
from shitate.progress import status
from shitate.runs import RunFolder


@dataclass
class LoadedModel:
    """A model ready to answer, with the template it was trained with."""

    reference: str
    model: Any
    tokenizer: Any
    template: ChatTemplate
    source: ModelSource
    system: str | None = None  # a run's system prompt from training: what chat and serve use when none is given


def with_system(messages: list[dict[str, str]], system: str | None) -> list[dict[str, str]]:
    """messages with `system` first where they have no system message of their own."""
    if not system or any(m["role"] == "system" for m in messages):
        return messages
    return [{"role": "system", "content": system}, *messages]


def load_for_inference(reference: str, template: str = "auto", dtype: Any = None) -> LoadedModel:
    """Load a model reference for generation; a run folder brings its adapter and its recipe's template."""
    with status(f"Loading {reference}…"):
        source = resolve(reference)
        if source.run is not None and template == "auto":
            template = RunFolder(source.run).recipe_setting("template", "auto")
        tokenizer = load_tokenizer(source)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        # bf16 where it is native, even on a CPU whose fp32 matmul is faster (models/precision.py): generating one
        # token at a time reads the weights more than it multiplies them, and ran as fast in bf16 (18.8 tokens/s
        # either way on the 2-core Xeon) at half the memory.
        dtype = dtype or (torch.bfloat16 if bf16_supported(device) else torch.float32)
        # Not merged: folding a LoRA delta into bf16 weights would round part of it away.
        model = load_model(source, dtype=dtype).to(device).eval()
    chat_template = get_template(template, tokenizer, model.config.model_type)
    system = RunFolder(source.run).system_prompt() if source.run is not None else None
    return LoadedModel(reference, model, tokenizer, chat_template, source, system)


class _InFlight:
    """The model work running now, in any thread, so that Python's exit can stop it and wait.

    Work in a daemon thread (the web UI's Evaluate button, a server's request) that is still inside torch when the
    interpreter tears down aborts it: "terminate called without an active exception", exit code 134. At exit each
    `generate` stops after its next token, each scoring pass finishes its batch, and both raise StoppedAtExit, so
    no caller keeps half an answer as a whole one.
    """

    def __init__(self) -> None:
        self.exiting = Event()
        self._threads: list[Thread] = []  # one entry per piece of work in progress
        self._changed = Condition()

    @contextlib.contextmanager
    def work(self) -> Iterator[None]:
        with self._changed:
            if self.exiting.is_set():  # exit has begun and may no longer wait: start nothing inside torch now
                raise StoppedAtExit("stopped: Python is exiting")
            self._threads.append(current_thread())
        try:
            yield
        finally:
            with self._changed:
                self._threads.remove(current_thread())
                self._changed.notify_all()
        if self.exiting.is_set():
            raise StoppedAtExit("stopped: Python is exiting")

    def stop_all(self, timeout: float = 60.0) -> None:
        self.exiting.set()
        with self._changed:
            stopped = set(self._threads)
            self._changed.wait_for(lambda: not self._threads, timeout=timeout)
        # A thread that ends now tears down its torch thread state while the interpreter does: the same abort, seen
        # once in a CI run. Give the stopped threads a moment to end; a pool's thread that lives on costs that moment.
        for thread in stopped:
            thread.join(timeout=2.0)


_in_flight = _InFlight()
atexit.register(_in_flight.stop_all)


def sampling_top_k(model: Any) -> int | None:
    """The top-k that sampling keeps for this model: its generation settings' (transformers' 50 where they name none),
    or None where they keep no top-k or name a filter the draw among the top k does not make (min_p, typical_p, …)."""
    config = getattr(model, "generation_config", None)
    top_k = getattr(config, "top_k", None)
    top_k = 50 if top_k is None else top_k  # transformers' default where a model's generation settings name none
    other_filters = [getattr(config, name, None) for name in ("min_p", "typical_p", "epsilon_cutoff", "eta_cutoff")]
    if not top_k or any(value not in (None, 0.0, 1.0) for value in other_filters):
        return None
    return int(top_k)


def sampling_settings(model: Any, temperature: float, top_p: float) -> dict[str, Any]:
    """generate()'s arguments for greedy decoding (temperature 0) or sampling — the sampling's draw made by
    `_DrawAmongTopK` where the model's generation settings keep a top-k (transformers' default keeps 50)."""
    if temperature <= 0:
        return {"do_sample": False}
    top_k = sampling_top_k(model)
    if top_k is None:  # no top-k, or a filter the draw does not make: generate() samples by itself
        return {"do_sample": True, "temperature": temperature, "top_p": top_p}
    # generate() runs greedy and takes the one word the processor leaves; its own sampling settings are unset so that
    # a model whose generation settings sample does not warn that they go unused.
    return {"do_sample": False, "temperature": None, "top_k": None, "top_p": None,
            "logits_processor": [_DrawAmongTopK(temperature, top_k, top_p)]}


def draw_among_top_k(scores: torch.Tensor, temperature: float | torch.Tensor, top_k: int | torch.Tensor,
                     top_p: float | torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One word id per row of scores (rows × vocabulary), drawn as generate() samples — temperature, then top-k, then
    top-p, in transformers' order — from k numbers a row. temperature, top_k and top_p: one for all rows or one per
    row.

    Written here because torch's CPU multinomial draws one exponential per vocabulary entry however few words top-k
    leaves: 4.2M numbers a step for 16 answers over Gemma 3's 262k words, 34% of a batch of rollouts on a 2-core Xeon,
    and transformers' continuous batcher sorts the whole vocabulary twice more for top-k and top-p (165 ms a step of 8
    requests against 5 ms drawn here, same Xeon).
    """
    widest = int(top_k.max()) if isinstance(top_k, torch.Tensor) else top_k
    values, words = scores.float().topk(min(widest, scores.shape[-1]), dim=-1)
    if isinstance(top_k, torch.Tensor):  # a row with a smaller k than the widest leaves its last words out
        beyond = torch.arange(values.shape[-1], device=values.device) >= top_k.view(-1, 1).to(values.device)
        values = values.masked_fill(beyond, -math.inf)
    scale = temperature.view(-1, 1).to(values) if isinstance(temperature, torch.Tensor) else temperature
    probs = (values / scale).softmax(dim=-1)  # past top-k, words have probability 0 in generate()'s softmax too
    if isinstance(top_p, torch.Tensor) or top_p < 1.0:
        # transformers drops a word when the mass of the words likelier than it reaches top_p
        reach = top_p.view(-1, 1).to(probs) if isinstance(top_p, torch.Tensor) else top_p
        probs = probs.masked_fill(probs.cumsum(dim=-1) - probs >= reach, 0.0)
    return words.gather(-1, torch.multinomial(probs, num_samples=1, generator=generator)).squeeze(-1)


class _DrawAmongTopK:
    """generate()'s sampling as a logits processor: the drawn word is the only one left, and greedy decoding takes it."""

    def __init__(self, temperature: float, top_k: int, top_p: float) -> None:
        self.temperature, self.top_k, self.top_p = temperature, top_k, top_p

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        chosen = draw_among_top_k(scores, self.temperature, self.top_k, self.top_p)
        return torch.full_like(scores, -math.inf).scatter_(-1, chosen.unsqueeze(-1), 0.0)


def _generation_kwargs(loaded: LoadedModel, spec: GenerateSpec, stop_at_turn_end: bool,
                       prompt_tokens: int) -> dict[str, Any]:
    tokenizer = loaded.tokenizer
    stops = stop_token_ids(tokenizer, loaded.template) if stop_at_turn_end else [tokenizer.eos_token_id]
    pad = tokenizer.pad_token_id
    return {"max_new_tokens": _room_for_answer(loaded, prompt_tokens, spec.max_new_tokens),
            "eos_token_id": [s for s in stops if s is not None], "pad_token_id": pad,
            "repetition_penalty": spec.repetition_penalty,
            **sampling_settings(loaded.model, spec.temperature, spec.top_p)}


def _room_for_answer(loaded: LoadedModel, prompt_tokens: int, max_new_tokens: int) -> int:
    """max_new_tokens, cut to the positions a model with a table of learned positions (GPT-2) has left after the
    prompt, so the answer ends there instead of the table running out mid-answer; a prompt that fills the table is
    refused, saying how long it is."""
    limit = learned_position_limit(loaded.model.config)
    if limit is None:
        return max_new_tokens
    if prompt_tokens >= limit:
        raise ConfigError(f"the prompt is {prompt_tokens} tokens, but {loaded.reference} has learned positions for "
                          f"{limit} tokens only (its position table has no row past them), prompt and answer together; "
                          "shorten the prompt (in a chat: start a new conversation).")
    return min(max_new_tokens, limit - prompt_tokens)


def _generate_batch(loaded: LoadedModel, texts: list[str], spec: GenerateSpec, stop_at_turn_end: bool) -> list[str]:
    tokenizer, model = loaded.tokenizer, loaded.model
    # Left padding (new tokens must follow every prompt directly), asked per call: the shared tokenizer stays as it is.
    inputs = tokenizer(texts, return_tensors="pt", padding=True, padding_side="left",
                       add_special_tokens=False).to(model.device)
    settings = _generation_kwargs(loaded, spec, stop_at_turn_end, prompt_tokens=inputs["input_ids"].shape[1])
    with torch.inference_mode(), _in_flight.work(), generating():  # generating: the answer check during training
        output = model.generate(**inputs, **settings, stopping_criteria=[_StopWhenSet(_in_flight.exiting)])
    new_tokens = output[:, inputs["input_ids"].shape[1]:]
    return [tokenizer.decode(row, skip_special_tokens=True).strip() for row in new_tokens]


def answer(loaded: LoadedModel, conversations: list[list[dict[str, str]]], spec: GenerateSpec,
           on_batch: Any = None) -> list[str]:
    """Answer each conversation (ending with a user turn) in batches, greedy unless the spec samples."""
    answers: list[str] = []
    for start in range(0, len(conversations), spec.batch_size):
        chunk = conversations[start:start + spec.batch_size]
        texts = [loaded.template(messages, add_generation_prompt=True) for messages in chunk]
        answers += _generate_batch(loaded, texts, spec, stop_at_turn_end=True)
        if on_batch is not None:
            on_batch(len(chunk))
    return answers


def continue_text(loaded: LoadedModel, prompt: str, spec: GenerateSpec) -> str:
    """Plain continuation of `prompt`, as a base model sees it (BOS first, no template)."""
    bos = loaded.tokenizer.bos_token or ""
    return _generate_batch(loaded, [bos + prompt], spec, stop_at_turn_end=False)[0]


def continue_texts(loaded: LoadedModel, prompts: list[str], spec: GenerateSpec) -> list[str]:
    """Plain continuations of several prompts, in batches (BOS first, no template)."""
    bos = loaded.tokenizer.bos_token or ""
    out: list[str] = []
    for start in range(0, len(prompts), spec.batch_size):
        out += _generate_batch(loaded, [bos + p for p in prompts[start:start + spec.batch_size]], spec,
                               stop_at_turn_end=False)
    return out


def choice_logprobs(loaded: LoadedModel, prompts: list[str], choices: list[list[str]],
                    batch_size: int = 8) -> list[list[float]]:
    """Summed log-probability of each choice's tokens after its prompt.

    Each question is one row: its prompt once, then every choice, each choice attending to the
    prompt and to itself only (a tree-shaped mask) with positions continuing from the prompt.
    The prompt is thus computed once instead of once per choice, and the output layer is applied
    only where a choice token is predicted.
    """
    tokenizer = loaded.tokenizer
    base = loaded.model.get_base_model() if hasattr(loaded.model, "get_base_model") else loaded.model
    bos = tokenizer.bos_token or ""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    device = loaded.model.device
    scores: list[list[float]] = []
    for start in range(0, len(prompts), batch_size):
        rows = [_choice_tree(tokenizer, bos + prompt, options)
                for prompt, options in zip(prompts[start:start + batch_size], choices[start:start + batch_size])]
        width = max(len(r["ids"]) for r in rows)
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        positions = torch.zeros((len(rows), width), dtype=torch.long)
        mask = torch.eye(width, dtype=torch.bool).repeat(len(rows), 1, 1)  # padding attends to itself only
        for r, row in enumerate(rows):
            n = len(row["ids"])
            ids[r, :n] = torch.tensor(row["ids"])
            positions[r, :n] = torch.tensor(row["positions"])
            mask[r, :n, :n] = row["mask"]
        mask = mask[:, None].to(device)
        layer_types = set(getattr(base.config, "layer_types", None) or [])
        attention: Any = mask
        if layer_types:  # per layer type; sliding-window layers also forget what is too far back
            window = getattr(base.config, "sliding_window", None) or width
            distance = positions[:, :, None] - positions[:, None, :]
            attention = {t: mask & (distance < window)[:, None].to(device) if t == "sliding_attention" else mask
                         for t in layer_types}
        with torch.inference_mode(), _in_flight.work():
            hidden = base.get_decoder()(input_ids=ids.to(device), position_ids=positions.to(device),
                                        attention_mask=attention).last_hidden_state
            row_index = torch.cat([torch.full((len(r["from"]),), i) for i, r in enumerate(rows)])
            sources = torch.cat([torch.tensor(r["from"]) for r in rows])
            targets = torch.cat([torch.tensor(r["targets"]) for r in rows]).to(device)
            logits = base.get_output_embeddings()(hidden[row_index, sources]).float()
            softcap = output_softcap(base)
            if softcap:
                logits = softcap * torch.tanh(logits / softcap)
            token_scores = logits.log_softmax(-1).gather(1, targets[:, None]).squeeze(1).cpu()
        offset = 0
        for row in rows:
            count = len(row["from"])
            per_token = token_scores[offset:offset + count]
            owners = torch.tensor(row["owner"])
            scores.append(torch.zeros(len(row["choice_count"])).index_add_(0, owners, per_token).tolist())
            offset += count
    return scores


def _choice_tree(tokenizer: Any, prompt: str, options: list[str]) -> dict[str, Any]:
    """One row: shared prompt tokens, then each choice's tokens; which position predicts which token."""
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    fulls = [tokenizer(prompt + option, add_special_tokens=False)["input_ids"] for option in options]
    # Where the tokenizer merges across the boundary, the shared part ends earlier for every choice.
    shared = min(next((k for k, (a, b) in enumerate(zip(prompt_ids, full)) if a != b), min(len(prompt_ids), len(full)))
                 for full in fulls)
    shared = max(1, min([shared] + [len(full) - 1 for full in fulls]))
    ids, positions, owner, sources, targets = list(prompt_ids[:shared]), list(range(shared)), [], [], []
    spans = []
    for j, full in enumerate(fulls):
        tail = full[shared:]
        begin = len(ids)
        ids += tail
        positions += list(range(shared, shared + len(tail)))
        spans.append((begin, len(ids)))
        for k, token in enumerate(tail):
            sources.append(shared - 1 if k == 0 else begin + k - 1)
            targets.append(token)
            owner.append(j)
    n = len(ids)
    mask = torch.zeros((n, n), dtype=torch.bool)
    mask[:shared, :shared] = torch.tril(torch.ones(shared, shared, dtype=torch.bool))
    for begin, end in spans:
        mask[begin:end, :shared] = True
        mask[begin:end, begin:end] = torch.tril(torch.ones(end - begin, end - begin, dtype=torch.bool))
    return {"ids": ids, "positions": positions, "mask": mask, "from": sources, "targets": targets, "owner": owner,
            "choice_count": options}


def _japanese_streamer_class() -> type:
    from transformers import TextIteratorStreamer

    class JapaneseStreamer(TextIteratorStreamer):
        """transformers' streamer holds text back until a space or a kanji, so kana-only Japanese appeared all at
        once at the end: release it after any CJK, kana or full-width character too — never half a character
        (an incomplete byte sequence decodes as U+FFFD)."""

        def _is_chinese_char(self, cp: int) -> bool:
            return (cp >= 0x3000 and cp != 0xFFFD) or super()._is_chinese_char(cp)

    return JapaneseStreamer


def stream_answer(loaded: LoadedModel, messages: list[dict[str, str]],
                  spec: GenerateSpec) -> Generator[str, None, None]:
    """Yield the answer's text piece by piece as it is generated."""
    tokenizer = loaded.tokenizer
    text = loaded.template(messages, add_generation_prompt=True)
    inputs = tokenizer(text, return_tensors="pt", add_special_tokens=False).to(loaded.model.device)
    streamer = _japanese_streamer_class()(tokenizer, skip_prompt=True, skip_special_tokens=True)
    cancelled = Event()
    settings = _generation_kwargs(loaded, spec, stop_at_turn_end=True, prompt_tokens=inputs["input_ids"].shape[1])
    kwargs = {**inputs, **settings, "streamer": streamer,
              "stopping_criteria": [_StopWhenSet(cancelled), _StopWhenSet(_in_flight.exiting)]}

    failures: list[Exception] = []

    def generate(kwargs: dict[str, Any]) -> None:
        ended = False  # generate ends the stream itself when it returns
        try:
            with torch.inference_mode(), _in_flight.work():
                loaded.model.generate(**kwargs)
                ended = True
        except StoppedAtExit:
            pass  # the answer ends where it stopped (or before it began, if exit had begun already)
        except Exception as error:  # noqa: BLE001 — raised again in the reader, which would otherwise wait forever
            # The error's frames hold the prompt's tensors; the reader must not receive them (see below).
            traceback.clear_frames(error.__traceback__)
            failures.append(error)
        finally:
            kwargs.clear()
            if not ended:
                streamer.end()

    # A daemon registered as work in flight: Python joins a plain thread before any exit hook runs, so quitting the
    # UI mid-answer waited for the whole answer. Now exit stops it after its next token and waits for that.
    worker = Thread(target=generate, args=(kwargs,), daemon=True)
    # The prompt's tensors go with the worker, which exit waits for: freed by the reader (a daemon nobody waits for)
    # as the interpreter tore down, a tensor's deallocation re-took the GIL inside torch's C++ and aborted the
    # process ("terminate called without an active exception"), about one exit in ten.
    del inputs, kwargs
    worker.start()
    try:
        yield from streamer
        if failures:
            raise failures[0]
    finally:  # the reader stopped early (Ctrl-C in `shitate chat`, a closed page): the answer stops too
        cancelled.set()
        worker.join()


class _StopWhenSet:
    """A stopping criterion for `generate`: stop every sequence once the event is set."""

    def __init__(self, event: Event) -> None:
        self.event = event

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)
