"""Stage sft — supervised fine-tuning: chats in, an adapter (or full model) out; loss on the answers only.

Reads top to bottom: session → tokenizer, template and data → model and adapter → the shared
loop (train/loop.py) → save. What the stage brings is its record type (chat JSONL, mixed by
weight), its batch builder (packed rows where padding would waste, else padded) and its
objective (the answer-only chunked loss of train/losses.py).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shitate.config import Recipe, SFTSpec
from shitate.data.collate import Example, loss_positions, pack_batch, pad_batch
from shitate.data.formats import conversation, read_chat
from shitate.data.mix import SourceShare, mix
from shitate.data.templates import (
    IGNORE_INDEX,
    ChatTemplate,
    RewrittenAnswer,
    encode_chat,
    end_marker_is_one_token,
    get_template,
)
from shitate.errors import DataError, Problem
from shitate.memory import release_memory
from shitate.models.adapters import prepare_for_training
from shitate.models.inference import LoadedModel
from shitate.models.load import ModelSource, load_config, load_tokenizer, resolve
from shitate.progress import say, status
from shitate.train.loop import fit
from shitate.train.losses import AnswerLoss
from shitate.train.session import DryRun, Objective, Session, drop_answerless


def run(recipe: Recipe, out: Path | None = None, resume: bool = False, force: bool = False, dry_run: bool = False,
        answers_check: Callable[[LoadedModel], dict[str, float]] | None = None) -> Path | DryRun:
    """Train `recipe`; return the run folder. A dry run trains two steps in a scratch folder and reports.

    `answers_check`, when given, scores the model as it trains every `eval.every_steps` steps (the
    caller brings it from the evals stage, so training does not depend on evaluation).
    """
    session = Session(recipe, out, resume, force, dry_run)
    with status(f"Loading {recipe.model} and the data…"):
        source = resolve(recipe.model)
        config = load_config(source)
        session.check_positions(config)
        data = read_data(recipe, source, config.model_type)
        release_memory()  # the tokenizer went with read_data's frame: 0.13 GB for a 262k-word vocabulary
        training = source.for_training()
        model = session.load_base(training)
    model = prepare_for_training(model, recipe.adapter, packed_attention=recipe.sft.packing is not False,
                                 activation_checkpointing=recipe.train.activation_checkpointing,
                                 compute_dtype=session.compute_dtype)

    objective = session.start(
        model, Objective(AnswerLoss(model, compute_dtype=session.compute_dtype),
                         make_batch=functools.partial(make_batch, spec=recipe.sft, pad_id=data.pad_id),
                         loss_terms=loss_positions, packed=recipe.sft.packing is not False),
        data.train, config,
        summary=f"{source.kind} model {recipe.model}, template {data.template}, {len(data.train)} train / "
                f"{len(data.validation)} validation examples",
        template=data.template, model_source={"kind": source.kind, "folder": source.folder},
        **({"data_mix": [s.as_dict(len(data.train)) for s in data.shares]} if recipe.data.is_mixed() else {}))
    if recipe.data.is_mixed():
        say("data mix: " + ", ".join(f"{s.path.name} {s.used} ({s.used / len(data.train):.0%})" for s in data.shares))

    checker: list[LoadedModel] = []  # the model as it trains, for eval.every_steps; made on first use

    def check_answers(step: int) -> None:
        if not (answers_check and recipe.eval.every_steps and step % recipe.eval.every_steps == 0 and session.is_main):
            return
        if not checker:
            tokenizer = load_tokenizer(source)
            template = get_template(recipe.template, tokenizer, config.model_type)
            checker.append(LoadedModel(recipe.model, model, tokenizer, template, source))
        model.eval()
        scores = answers_check(checker[0])
        model.train()
        session.log({"step": step, **scores})
        say(f"step {step}: " + ", ".join(f"{k} {v:.2f}" for k, v in scores.items()))

    fitted = fit(session, objective, data.train, data.validation, on_step=check_answers)
    if dry_run:
        return session.report_dry_run(objective, sum(len(e["input_ids"]) for e in data.validation), fitted.tokens,
                                      fitted.step_seconds)

    return session.finish(model, source, fitted.tokens, fitted.seconds, fitted.steps)


@dataclass
class ChatData:
    """The encoded examples and what training needs of the tokenizer, without the tokenizer itself."""

    train: list[Example]
    validation: list[Example]
    shares: list[SourceShare]
    template: str
    pad_id: int


def read_data(recipe: Recipe, source: ModelSource, model_type: str | None) -> ChatData:
    """Encode the recipe's chats. The tokenizer lives only in this frame: training never needs it again."""
    tokenizer = load_tokenizer(source)
    template = get_template(recipe.template, tokenizer, model_type)
    if not end_marker_is_one_token(tokenizer, template):
        say(f"[yellow]warning:[/] this tokenizer does not know {template.end_of_turn!r} as one token, so the "
            f"{template.name} template's turns may blur into each other; prefer the model's own template (auto).")
    encode = functools.partial(encode_chats, recipe=recipe, tokenizer=tokenizer, template=template)
    train_set, shares = mix(recipe.data.train_sources(), encode, recipe.train.seed)
    validation_set = encode(recipe.data.validation) if recipe.data.validation else []
    pad_id = tokenizer.pad_token_id
    return ChatData(train_set, validation_set, shares, template.name, pad_id)


def encode_chats(path: Path, recipe: Recipe, tokenizer: Any, template: ChatTemplate) -> list[Example]:
    """A chat JSONL file as token ids and answer-only labels; every problem of the file is raised at once."""
    path = Path(path)
    if path.is_dir() or path.suffix.lower() in (".txt", ".md", ".markdown"):
        raise DataError([Problem(path, None, None, "is raw text, and stage sft trains on chats (JSONL with "
                                 '"messages")', "for continued pretraining on text set `stage: pretrain`; to make "
                                 "chats from question/answer data use `shitate data import`")])
    examples, problems, answerless = [], [], []
    for line, record in read_chat(path):
        messages = conversation(record, recipe.data.system)
        if messages[-1]["role"] != "assistant":
            problems.append(Problem(path, line, "messages", "does not end with an assistant turn",
                                    "run `shitate data check` on the file"))
            continue
        try:
            example = encode_chat(messages, tokenizer, template, recipe.train.max_length)
        except RewrittenAnswer as err:
            problems.append(Problem(path, line, "messages", err.what, err.fix))
            continue
        if all(label == IGNORE_INDEX for label in example["labels"][1:]):
            answerless.append(line)
            continue
        examples.append(example)
    if problems:
        raise DataError(problems)
    drop_answerless(path, answerless, len(examples), recipe.train)
    return examples


def make_batch(examples: list[Example], device: Any, spec: SFTSpec, pad_id: int) -> dict[str, Any]:
    """Packed rows when the recipe packs, else a padded batch."""
    lengths = [len(e["input_ids"]) for e in examples]
    # Packing computes attention example by example; for batches of similar lengths one padded call is cheaper.
    wasteful = len(lengths) * max(lengths) > 1.1 * sum(lengths)
    if spec.packing is True or (spec.packing == "auto" and wasteful):
        return pack_batch(examples, spec.pack_length, pad_id, device)
    return pad_batch(examples, pad_id, device)
