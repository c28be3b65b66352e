"""Generation shared by `generate`, `chat`, `compare` and `eval`: batched, stopping at the template's end marker."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from threading import Thread
from typing import Any

import torch

from shitate.config import GenerateSpec
from shitate.data.templates import ChatTemplate, get_template, stop_token_ids
from shitate.models.load import ModelSource, load_model, load_tokenizer, pick_precision, resolve
from shitate.progress import status


@dataclass
class LoadedModel:
    """A model ready to answer, with the template it was trained with."""

    reference: str
    model: Any
    tokenizer: Any
    template: ChatTemplate
    source: ModelSource


def load_for_inference(reference: str, template: str = "auto") -> LoadedModel:
    """Load a model reference for generation; a run folder brings its adapter and its recipe's template."""
    with status(f"Loading {reference}…"):
        source = resolve(reference)
        if source.run is not None and template == "auto":
            import yaml

            template = yaml.safe_load((source.run / "recipe.yaml").read_text(encoding="utf-8")).get("template", "auto")
        tokenizer = load_tokenizer(source)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = torch.bfloat16 if pick_precision("auto", device) == "bf16" else torch.float32
        # Not merged: folding a LoRA delta into bf16 weights would round part of it away.
        model = load_model(source, dtype=dtype).to(device).eval()
    chat_template = get_template(template, tokenizer, model.config.model_type)
    return LoadedModel(reference, model, tokenizer, chat_template, source)


def _sampling(spec: GenerateSpec) -> dict[str, Any]:
    if spec.temperature <= 0:
        return {"do_sample": False}
    return {"do_sample": True, "temperature": spec.temperature, "top_p": spec.top_p}


def _generation_kwargs(loaded: LoadedModel, spec: GenerateSpec, stop_at_turn_end: bool) -> dict[str, Any]:
    tokenizer = loaded.tokenizer
    stops = stop_token_ids(tokenizer, loaded.template) if stop_at_turn_end else [tokenizer.eos_token_id]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return {"max_new_tokens": spec.max_new_tokens, "eos_token_id": [s for s in stops if s is not None],
            "pad_token_id": pad, "repetition_penalty": spec.repetition_penalty, **_sampling(spec)}


def _generate_batch(loaded: LoadedModel, texts: list[str], spec: GenerateSpec, stop_at_turn_end: bool) -> list[str]:
    tokenizer, model = loaded.tokenizer, loaded.model
    tokenizer.padding_side = "left"  # new tokens must follow every prompt directly
    inputs = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
    with torch.inference_mode():
        output = model.generate(**inputs, **_generation_kwargs(loaded, spec, stop_at_turn_end))
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
                    batch_size: int = 20) -> list[list[float]]:
    """Summed log-probability of each choice's tokens after its prompt.

    All choices of a batch go through one forward pass, and the output layer is applied only at
    the positions that predict a choice token (as in training), which is what makes multiple
    choice cheap on a CPU.
    """
    tokenizer = loaded.tokenizer
    base = loaded.model.get_base_model() if hasattr(loaded.model, "get_base_model") else loaded.model
    bos = tokenizer.bos_token or ""
    pairs = [(i, j, bos + prompt, choice) for i, (prompt, options) in enumerate(zip(prompts, choices))
             for j, choice in enumerate(options)]
    scores = [[0.0] * len(options) for options in choices]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    for start in range(0, len(pairs), batch_size):
        batch = pairs[start:start + batch_size]
        rows, spans = [], []
        for _, _, prompt, choice in batch:
            prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
            full_ids = tokenizer(prompt + choice, add_special_tokens=False)["input_ids"]
            shared = next((k for k, (a, b) in enumerate(zip(prompt_ids, full_ids)) if a != b), len(prompt_ids))
            shared = min(shared, len(full_ids) - 1)  # at least one choice token is scored
            rows.append(full_ids)
            spans.append((shared, len(full_ids)))
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for r, row in enumerate(rows):
            ids[r, :len(row)] = torch.tensor(row)
            mask[r, :len(row)] = 1
        ids, mask = ids.to(loaded.model.device), mask.to(loaded.model.device)
        with torch.inference_mode():
            hidden = base.get_decoder()(input_ids=ids, attention_mask=mask).last_hidden_state
            row_index = torch.cat([torch.full((end - begin,), r) for r, (begin, end) in enumerate(spans)])
            positions = torch.cat([torch.arange(begin - 1, end - 1) for begin, end in spans])
            targets = ids[row_index, positions + 1]
            logits = base.get_output_embeddings()(hidden[row_index, positions]).float()
            softcap = getattr(base.config, "final_logit_softcapping", None)
            if softcap:
                logits = softcap * torch.tanh(logits / softcap)
            token_scores = logits.log_softmax(-1).gather(1, targets[:, None]).squeeze(1)
            sums = torch.zeros(len(rows)).index_add_(0, row_index, token_scores.cpu())
        for (i, j, _, _), value in zip(batch, sums.tolist()):
            scores[i][j] = value
    return scores


def stream_answer(loaded: LoadedModel, messages: list[dict[str, str]], spec: GenerateSpec) -> Iterator[str]:
    """Yield the answer's text piece by piece as it is generated."""
    from transformers import TextIteratorStreamer

    tokenizer = loaded.tokenizer
    text = loaded.template(messages, add_generation_prompt=True)
    inputs = tokenizer(text, return_tensors="pt", add_special_tokens=False).to(loaded.model.device)
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    kwargs = {**inputs, **_generation_kwargs(loaded, spec, stop_at_turn_end=True), "streamer": streamer}
    worker = Thread(target=lambda: loaded.model.generate(**kwargs), daemon=True)
    worker.start()
    yield from streamer
    worker.join()
