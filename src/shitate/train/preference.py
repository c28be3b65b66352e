"""Stages reward, dpo and orpo — preference pairs in; a reward model, or a model that prefers the chosen answers.

Reads top to bottom: session → tokenizer, template and pairs → model and adapter → (dpo) the
reference log-probabilities, once → the shared loop (train/loop.py), validating before the
first step → save. What the stages bring: one record type (prompt/chosen/rejected pairs), one
batch builder (each pair one tree-shaped example: the prompt once, then both answers, each
seeing only the prompt and itself — data/collate.tree_batch), and an objective each:

- reward: a scalar head on the last token of each answer, Bradley–Terry loss; pairwise accuracy.
- dpo: sigmoid DPO or IPO against the starting model. With an adapter that is the base with the
  adapter off, and since it never changes its log-probabilities are computed once per pair
  before training (and kept in the run folder for a resume), not again every epoch.
- orpo: the chosen answer's NLL plus λ times the odds-ratio loss, from the base, no reference.

Each stage validates before the first step and after each epoch — dpo and orpo the share of held-out
pairs whose chosen answer the model finds likelier (mean log-probability per token), reward its
pairwise accuracy — so a run shows whether it moved the model.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from shitate.config import Recipe
from shitate.data.collate import Example, split_by_tokens, tree_batch
from shitate.data.mix import SourceShare, mix
from shitate.data.preference import encode_pair, read_preferences
from shitate.data.templates import ChatTemplate, get_template
from shitate.errors import ConfigError
from shitate.memory import release_memory
from shitate.models.adapters import prepare_for_training
from shitate.models.load import ModelSource, load_config, load_tokenizer, resolve
from shitate.models.logprobs import AnswerLogProbs, logprob_inputs
from shitate.models.reward import RewardModel
from shitate.progress import say, status
from shitate.train.loop import fit, validation_micro_batches
from shitate.train.losses import bradley_terry_losses, dpo_losses, orpo_losses
from shitate.train.session import DryRun, Objective, Session, drop_answerless


def run(recipe: Recipe, out: Path | None = None, resume: bool = False, force: bool = False,
        dry_run: bool = False) -> Path | DryRun:
    """Train stage reward, dpo or orpo as `recipe` says; return the run folder."""
    session = Session(recipe, out, resume, force, dry_run)
    spec = getattr(recipe, recipe.stage)
    with status(f"Loading {recipe.model} and the preference pairs…"):
        source = resolve(recipe.model)
        config = load_config(source)
        session.check_positions(config)
        data = read_data(recipe, source, config.model_type)
        release_memory()  # the tokenizer went with read_data's frame
        training = source.for_training()
        model = session.load_base(training)
    model = session.place(prepare_for_training(model, recipe.adapter, packed_attention=True,
                                               activation_checkpointing=recipe.train.activation_checkpointing,
                                               compute_dtype=session.compute_dtype))

    logprobs = AnswerLogProbs(model, compute_dtype=session.compute_dtype)
    if recipe.stage == "reward":
        model = RewardModel(model)
        module: nn.Module = RewardLoss(model, spec.margin)
    elif recipe.stage == "dpo":
        attach_reference(session, logprobs, data, spec.pack_length)
        module = DPOLoss(logprobs, spec.beta, spec.loss)
    else:
        module = ORPOLoss(logprobs, spec.odds_ratio_weight)

    objective = session.start(
        model, Objective(module, make_batch=lambda pairs, device: tree_batch(pairs, spec.pack_length, data.pad_id, device),
                         loss_terms=lambda pair: 1),
        data.train, config,
        summary=f"{source.kind} model {recipe.model}, template {data.template}, {len(data.train)} train / "
                f"{len(data.validation)} validation pairs",
        template=data.template, model_source={"kind": source.kind, "folder": source.folder},
        **({"data_mix": [s.as_dict(len(data.train)) for s in data.shares]} if recipe.data.is_mixed() else {}))
    if recipe.stage == "dpo" and session.is_main and not dry_run:
        session.run.save_reference_logps({"train": [e["reference"] for e in data.train],
                                          "validation": [e["reference"] for e in data.validation]})

    fitted = fit(session, objective, data.train, data.validation, validate_first=True)
    if dry_run:
        return session.report_dry_run(objective, sum(len(e["input_ids"]) for e in data.validation), fitted.tokens,
                                      fitted.step_seconds)
    facts = session.run.validation_before_and_after()
    for name, values in facts.items():
        say(f"{name.replace('_', ' ')} on the validation pairs: {values['before']:.3f} before, "
            f"{values['after']:.3f} after training.")
    return session.finish(model, source, fitted.tokens, fitted.seconds, fitted.steps, **facts)


# --- data ---------------------------------------------------------------------------------------------------------

@dataclass
class PairData:
    """Pairs as tree-shaped token rows, and what training needs of the tokenizer, without the tokenizer itself."""

    train: list[Example]
    validation: list[Example]
    shares: list[SourceShare]
    template: str
    pad_id: int


def read_data(recipe: Recipe, source: ModelSource, model_type: str | None) -> PairData:
    """Encode the recipe's pairs. The tokenizer lives only in this frame."""
    tokenizer = load_tokenizer(source)
    template = get_template(recipe.template, tokenizer, model_type)
    encode = functools.partial(encode_pairs, recipe=recipe, tokenizer=tokenizer, template=template)
    train_set, shares = mix(recipe.data.train_sources(), encode, recipe.train.seed)
    validation_set = encode(recipe.data.validation) if recipe.data.validation else []
    pad_id = tokenizer.pad_token_id
    return PairData(train_set, validation_set, shares, template.name, pad_id)


def encode_pairs(path: Path, recipe: Recipe, tokenizer: Any, template: ChatTemplate) -> list[Example]:
    """A preference JSONL as tree-shaped examples; every problem of the file is raised at once."""
    examples, answerless = [], []
    for line, pair in read_preferences(Path(path)):
        example = encode_pair(pair, tokenizer, template, recipe.train.max_length, recipe.data.system)
        if example is None:
            answerless.append(line)
        else:
            examples.append(example)
    drop_answerless(Path(path), answerless, len(examples), recipe.train)
    return examples


# --- the reference (dpo) ------------------------------------------------------------------------------------------

@torch.no_grad()
def reference_logps(logprobs: AnswerLogProbs, groups: list[list[Example]], capacity: int, pad_id: int, device: Any,
                    bf16: bool) -> list[list[float]]:
    """Summed log-probability of the chosen and rejected answer of each pair of `groups` (batched as given, listed
    in their order) under the model as it is now, without its adapter: the reference DPO measures against."""
    causal_lm = logprobs.causal_lm
    was_training = causal_lm.training
    causal_lm.eval()
    adapter_off = causal_lm.disable_adapter() if hasattr(causal_lm, "disable_adapter") else contextlib.nullcontext()
    values: list[list[float]] = []
    with adapter_off:
        for group in groups:
            batch = tree_batch(group, capacity, pad_id, device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                logps, _ = logprobs(**logprob_inputs(batch))
            values.extend(logps.view(-1, 2).tolist())
    causal_lm.train(was_training)
    return values


def attach_reference(session: Session, logprobs: AnswerLogProbs, data: PairData, capacity: int) -> None:
    """Put each pair's reference log-probabilities on it: read back on a resume, else computed once now."""
    saved = session.run.reference_logps() if session.resume else None
    if saved is not None and [len(saved["train"]), len(saved["validation"])] == [len(data.train), len(data.validation)]:
        for example, values in zip(data.train + data.validation, saved["train"] + saved["validation"]):
            example["reference"] = values
        return
    if session.resume and session.recipe.adapter.method == "full":
        raise ConfigError(f"{session.run.path}: the reference log-probabilities of this full fine-tuning run are "
                          "missing, and the weights have moved since they were taken; start again with --force.")
    # Validation's pairs go in validation's own micro-batches: before the first step the policy is the reference,
    # so its implicit rewards are exactly 0 there only if both passes batch alike (the same pairs batched otherwise
    # differ in the last bits, margins of 2·10⁻⁶ on the default model in fp32, whose signs read as an accuracy).
    batched = (split_by_tokens(data.train, capacity, packed=True),
               validation_micro_batches(session, data.validation, packed=True))
    with status(f"Reference log-probabilities of {len(data.train) + len(data.validation)} pairs (once)…"):
        for groups in batched:
            if groups:
                computed = reference_logps(logprobs, groups, capacity, data.pad_id, session.device, session.bf16)
                for example, pair_values in zip([e for group in groups for e in group], computed):
                    example["reference"] = pair_values


# --- objectives ---------------------------------------------------------------------------------------------------

def _preferred(logps: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Per pair: 1 where the chosen answer has the higher mean log-probability per token, ½ for a tie, else 0."""
    mean = (logps / counts.clamp(min=1)).view(-1, 2)
    return (mean[:, 0] > mean[:, 1]).float() + 0.5 * (mean[:, 0] == mean[:, 1]).float()


class DPOLoss(nn.Module):
    """DPO (or IPO) per pair against cached reference log-probabilities; returns (sum, pairs, statistics)."""

    def __init__(self, logprobs: AnswerLogProbs, beta: float, kind: str = "sigmoid") -> None:
        super().__init__()
        self.logprobs, self.beta, self.kind = logprobs, beta, kind

    def forward(self, reference: torch.Tensor, last: torch.Tensor, **batch: Any) -> tuple[torch.Tensor, int, dict]:
        logps, counts = self.logprobs(**logprob_inputs({**batch, "last": last}))
        policy, counts = logps.view(-1, 2), counts.view(-1, 2)
        if self.kind == "ipo":  # IPO compares mean log-probabilities per token
            policy, reference = policy / counts, reference / counts
        losses = dpo_losses(policy[:, 0], policy[:, 1], reference[:, 0], reference[:, 1], self.beta, self.kind)
        rewards = self.beta * (policy - reference).detach()  # DPO's implicit reward of each answer
        margin = rewards[:, 0] - rewards[:, 1]
        stats = {"reward_accuracy": ((margin > 0).float() + 0.5 * (margin == 0).float()).sum(),
                 "reward_margin": margin.sum(), "preference_accuracy": _preferred(logps.detach(), counts.flatten()).sum()}
        return losses.sum(), losses.shape[0], stats


class ORPOLoss(nn.Module):
    """ORPO per pair on mean per-token log-probabilities; returns (sum, pairs, statistics)."""

    def __init__(self, logprobs: AnswerLogProbs, weight: float) -> None:
        super().__init__()
        self.logprobs, self.weight = logprobs, weight

    def forward(self, last: torch.Tensor, **batch: Any) -> tuple[torch.Tensor, int, dict]:
        logps, counts = self.logprobs(**logprob_inputs({**batch, "last": last}))
        mean = (logps / counts.clamp(min=1)).view(-1, 2)
        losses = orpo_losses(mean[:, 0], mean[:, 1], self.weight)
        stats = {"preference_accuracy": _preferred(logps.detach(), counts).sum(),
                 "chosen_nll": -mean[:, 0].detach().sum()}
        return losses.sum(), losses.shape[0], stats


class RewardLoss(nn.Module):
    """Bradley–Terry loss per pair on the reward model's scores; returns (sum, pairs, statistics)."""

    def __init__(self, reward_model: RewardModel, margin: float = 0.0) -> None:
        super().__init__()
        self.reward_model, self.margin = reward_model, margin

    def forward(self, **batch: Any) -> tuple[torch.Tensor, int, dict]:
        rewards = self.reward_model(**batch).view(-1, 2)
        losses = bradley_terry_losses(rewards[:, 0], rewards[:, 1], self.margin)
        gap = (rewards[:, 0] - rewards[:, 1]).detach()
        stats = {"accuracy": ((gap > 0).float() + 0.5 * (gap == 0).float()).sum(), "reward_margin": gap.sum()}
        return losses.sum(), losses.shape[0], stats
