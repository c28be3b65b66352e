"""Stage pretrain — continued pretraining: raw text in, loss on every token, perplexity before and after.

Reads top to bottom: session → tokenizer and documents → model and adapter → the shared loop
(train/loop.py), validating once before the first step → save. What the stage brings: its
record type (text JSONL, .txt/.md files or folders, mixed by weight), its batch builder
(whole documents packed into rows of pretrain.block_size, each attending only within itself;
only a document longer than a row is cut) and the same chunked cross-entropy as sft, over every token.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shitate.config import Recipe
from shitate.data.collate import Example, documents_to_rows, loss_positions, segments_batch
from shitate.data.mix import SourceShare, mix
from shitate.data.text import Document, read_documents
from shitate.memory import release_memory
from shitate.models.adapters import prepare_for_training
from shitate.models.load import ModelSource, load_config, load_tokenizer, resolve
from shitate.progress import say, status
from shitate.train.loop import fit
from shitate.train.losses import AnswerLoss
from shitate.train.session import DryRun, Objective, Session


def run(recipe: Recipe, out: Path | None = None, resume: bool = False, force: bool = False,
        dry_run: bool = False) -> Path | DryRun:
    """Continue pretraining as `recipe` says; return the run folder."""
    session = Session(recipe, out, resume, force, dry_run)
    block_size = recipe.pretrain.block_size
    with status(f"Loading {recipe.model} and the text…"):
        source = resolve(recipe.model)
        config = load_config(source)
        session.check_positions(config)
        data = read_data(recipe, source)
        release_memory()  # the tokenizer went with read_data's frame: 0.13 GB for a 262k-word vocabulary
        training = source.for_training()
        model = session.load_base(training)
    model = prepare_for_training(model, recipe.adapter, packed_attention=True,
                                 activation_checkpointing=recipe.train.activation_checkpointing,
                                 compute_dtype=session.compute_dtype)

    tokens = sum(len(row["input_ids"]) for row in data.train)
    objective = session.start(
        model, Objective(AnswerLoss(model, compute_dtype=session.compute_dtype),
                         make_batch=functools.partial(_make_batch, pad_id=data.pad_id), loss_terms=loss_positions,
                         validation_metrics=perplexity_metrics),
        data.train, config,
        summary=f"{source.kind} model {recipe.model}, {data.documents} documents ({tokens:,} tokens) in "
                f"{len(data.train)} rows of up to {block_size} tokens, {len(data.validation)} validation rows",
        model_source={"kind": source.kind, "folder": source.folder}, train_tokens=tokens,
        **({"data_mix": [s.as_dict(data.documents) for s in data.shares]} if recipe.data.is_mixed() else {}))

    fitted = fit(session, objective, data.train, data.validation, validate_first=True)
    if dry_run:
        return session.report_dry_run(objective, sum(len(r["input_ids"]) for r in data.validation), fitted.tokens,
                                      fitted.step_seconds)
    # Read back from metrics.jsonl: a resumed run measured "before" in its first life.
    perplexities = [r["val_perplexity"] for r in session.run.metrics() if "val_perplexity" in r]
    facts = {"perplexity": {"before": perplexities[0], "after": perplexities[-1]}} if perplexities else {}
    if perplexities:
        say(f"Perplexity on the held-out text: {perplexities[0]:.2f} before, {perplexities[-1]:.2f} after training.")

    return session.finish(model, source, fitted.tokens, fitted.seconds, fitted.steps, **facts)


@dataclass
class TextData:
    """Documents as rows of token ids, and what training needs of the tokenizer, without the tokenizer itself."""

    train: list[Example]
    validation: list[Example]
    documents: int
    shares: list[SourceShare]
    pad_id: int


def read_data(recipe: Recipe, source: ModelSource) -> TextData:
    """Read, encode and pack the recipe's text. The tokenizer lives only in this frame."""
    tokenizer = load_tokenizer(source)
    block_size = recipe.pretrain.block_size
    documents, shares = mix(recipe.data.train_sources(), read_documents, recipe.train.seed)
    bos = tokenizer.bos_token_id
    train_set = documents_to_rows(encode_documents(documents, tokenizer), block_size, bos)
    validation_set = (documents_to_rows(encode_documents(read_documents(recipe.data.validation), tokenizer), block_size,
                                        bos) if recipe.data.validation else [])
    pad_id = tokenizer.pad_token_id
    return TextData(train_set, validation_set, len(documents), shares, pad_id)


def encode_documents(documents: list[Document], tokenizer: Any) -> list[list[int]]:
    """Each document as <bos> text <eos>, so the model learns where documents begin and end."""
    texts = [d.text for d in documents]
    encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    return [bos + ids + eos for ids in encoded]


def perplexity_metrics(loss: float, stats: dict[str, float]) -> dict[str, float]:
    """Validation loss per token, its perplexity (exp of it), and the other statistics (token accuracy)."""
    return {"val_loss": loss, "val_perplexity": math.exp(min(loss, 50.0)), **{f"val_{k}": v for k, v in stats.items()}}


def _make_batch(rows: list[Example], device: Any, pad_id: int) -> dict[str, Any]:
    return segments_batch(rows, pad_id, device)
