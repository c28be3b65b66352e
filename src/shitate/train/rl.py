"""Stages ppo and grpo — prompts in; answers sampled, rewarded, and made likelier the better they scored.

Reads top to bottom: checks (a reward, a start point, one tokenizer) before anything loads →
session → prompts → the start model (a run folder's adapter merged in) with a fresh adapter on
top, so that the start is the same weights with the adapter switched off: the KL reference
costs no second copy → rollouts, each: sample answers with the KV cache, reward them (the
recipe's rubric and/or a reward model, weighted), take log-probabilities under the policy and
the reference, then a few clipped updates → save.

- ppo (InstructGPT): per-token reward −β·KL with the score added at the answer's last token; a
  value head on the policy's hidden states; GAE; clipped policy and value losses.
- grpo (DeepSeekMath): several answers per prompt; each answer's advantage is its reward against
  its group's mean, in units of the group's spread; no value head; β·KL (the k3 estimate) in the loss.

TRL's stable API no longer ships PPO, and its GRPOTrainer does not take our tree rows; this is
written small on purpose, and shares the session (optimizer, schedule, checkpoints with random
states, interrupt, metrics) and the answer log-probability kernel with every other stage.
Losses are averaged over all answer tokens of a rollout.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from shitate.config import Recipe
from shitate.data.collate import split_by_tokens, tree_batch
from shitate.data.formats import read_questions
from shitate.data.mix import mix
from shitate.data.templates import IGNORE_INDEX, get_template, stop_token_ids
from shitate.errors import ConfigError, TrainingDiverged
from shitate.models.adapters import prepare_for_training
from shitate.models.inference import sampling_settings
from shitate.models.load import load_config, load_model, load_tokenizer, resolve
from shitate.models.logprobs import AnswerLogProbs, logprob_inputs
from shitate.models.precision import generating
from shitate.progress import say, status, training_bar
from shitate.runs import RunFolder
from shitate.train.loop import epoch_batches
from shitate.train.session import DryRun, Objective, Session

RubricReward = Callable[[list[str]], list[float]]  # answers → share of the rubric's checks each passes

# --- the pieces, each checked against values computed by hand in tests/unit/test_rl.py ------------------------------


def kl_estimate(logp: torch.Tensor, reference_logp: torch.Tensor, kind: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(policy ‖ reference) from the sampled tokens' log-probabilities.

    k1 = log π − log π_ref (unbiased, can be negative; InstructGPT's reward shaping); k3 =
    exp(log π_ref − log π) − (log π_ref − log π) − 1 (unbiased and never negative; GRPO's loss).
    """
    if kind == "k3":
        log_ratio = reference_logp - logp
        return torch.exp(log_ratio) - log_ratio - 1.0
    return logp - reference_logp


def gae(rewards: torch.Tensor, values: torch.Tensor, gamma: float, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over one answer's tokens (the value after the last token is 0).

    Returns (advantages, returns = advantages + values).
    """
    advantages = torch.zeros_like(rewards)
    running: float | torch.Tensor = 0.0
    for t in reversed(range(rewards.shape[0])):
        following = values[t + 1] if t + 1 < rewards.shape[0] else 0.0
        delta = rewards[t] + gamma * following - values[t]
        running = delta + gamma * lam * running
        advantages[t] = running
    return advantages, advantages + values


def clipped_policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor,
                        clip: float) -> torch.Tensor:
    """Per token: max(−A·r, −A·clip(r, 1−ε, 1+ε)) with r = π/π_old."""
    ratio = torch.exp(logp - old_logp)
    return torch.maximum(-advantages * ratio, -advantages * ratio.clamp(1.0 - clip, 1.0 + clip))


def clipped_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
                       clip: float) -> torch.Tensor:
    """Per token: ½·max((V − R)², (V_old + clip(V − V_old, ±ε) − R)²)."""
    clipped = old_values + (values - old_values).clamp(-clip, clip)
    return 0.5 * torch.maximum((values - returns) ** 2, (clipped - returns) ** 2)


def group_advantages(rewards: torch.Tensor, group: int, eps: float = 1e-4) -> torch.Tensor:
    """GRPO: each reward against the mean of its prompt's group, over the group's standard deviation."""
    grouped = rewards.view(-1, group)
    spread = grouped.std(dim=1, keepdim=True)
    return ((grouped - grouped.mean(dim=1, keepdim=True)) / (spread + eps)).flatten()


# --- the stage ----------------------------------------------------------------------------------------------------

def check_recipe(recipe: Recipe) -> None:
    """Refuse, before anything loads: no start point for ppo, a missing or mismatched reward model."""
    spec = getattr(recipe, recipe.stage)
    if recipe.stage == "ppo" and not RunFolder(recipe.model).is_finished():
        raise ConfigError(f"model: {recipe.model} is not a finished run folder. PPO starts from a tuned model, as "
                          "InstructGPT does: train one with stage sft and name its run folder (runs/NAME) here; "
                          "stage grpo can start from any model.")
    if spec.reward_model is not None and spec.reward_model_weight > 0:
        reward_run = RunFolder(spec.reward_model)
        if not reward_run.is_finished() or reward_run.recipe_setting("stage") != "reward":
            raise ConfigError(f"{recipe.stage}.reward_model: {spec.reward_model} is not a finished run of stage reward.")
        if not _same_tokenizer(resolve(recipe.model), resolve(str(spec.reward_model))):
            raise ConfigError(f"{recipe.stage}.reward_model: {spec.reward_model} reads text with another tokenizer than "
                              f"the policy ({recipe.model}); train the reward model from the same base model.")


def _same_tokenizer(a: Any, b: Any) -> bool:
    if a.folder == b.folder:
        return True
    return load_tokenizer(a).get_vocab() == load_tokenizer(b).get_vocab()


@dataclass
class Rollout:
    """One batch of prompts with their sampled answers, as tree batches (each prompt once, then its answers)."""

    batches: list[dict[str, Any]]
    answers: list[str]
    rewards: torch.Tensor          # one per answer
    old_logps: torch.Tensor        # per answer token, in tree_batch's order
    reference_logps: torch.Tensor
    owners: torch.Tensor           # which answer each token belongs to
    old_values: torch.Tensor | None = None


class Policy(nn.Module):
    """The model being trained and, for ppo, a value head read at the positions that predict each answer token."""

    causal_lm: Any  # a transformers model (or PEFT's wrapper of one): typed loosely upstream

    def __init__(self, causal_lm: Any, compute_dtype: torch.dtype, value_head: bool) -> None:
        super().__init__()
        self.causal_lm = causal_lm
        self.logprobs = AnswerLogProbs(causal_lm, compute_dtype)
        self.value_head = nn.Linear(causal_lm.config.get_text_config().hidden_size, 1) if value_head else None
        if self.value_head is not None:
            nn.init.zeros_(self.value_head.weight)
            nn.init.zeros_(self.value_head.bias)

    def forward(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Per answer token: log-probability under the policy, and the value of the state before it (ppo)."""
        token_logps, states = self.logprobs.token_logps(**logprob_inputs(batch))
        values = None
        if self.value_head is not None:
            hidden = states.reshape(-1, states.shape[-1])[batch["sources"]]
            values = self.value_head(hidden.to(self.value_head.weight.dtype)).squeeze(-1).float()
        return token_logps, values

    def set_attn_implementation(self, name: str) -> None:
        self.causal_lm.set_attn_implementation(name)

    def save_pretrained(self, folder: Path, safe_serialization: bool = True) -> None:
        """The adapter (or model) only: the value head serves training, not answering."""
        self.causal_lm.save_pretrained(folder, safe_serialization=safe_serialization)


def run(recipe: Recipe, out: Path | None = None, resume: bool = False, force: bool = False, dry_run: bool = False,
        rubric_reward: RubricReward | None = None) -> Path | DryRun:
    """Train stage ppo or grpo; return the run folder. The caller brings the rubric as a reward function (from the
    evals stage, so training does not depend on evaluation)."""
    spec = getattr(recipe, recipe.stage)
    check_recipe(recipe)
    session = Session(recipe, out, resume, force, dry_run)
    with status(f"Loading {recipe.model}, the prompts and the reward…"):
        source = resolve(recipe.model)
        config = load_config(source)
        session.check_positions(config)
        tokenizer = load_tokenizer(source)  # kept: answers are decoded to text for the rubric
        template = get_template(recipe.template if source.run is None else
                                RunFolder(source.run).recipe_setting("template", recipe.template), tokenizer,
                                config.model_type)
        prompts, _ = mix(recipe.data.train_sources(), lambda path: _encode_prompts(path, recipe, tokenizer, template),
                         recipe.train.seed)
        validation = _encode_prompts(recipe.data.validation, recipe, tokenizer, template) if recipe.data.validation else []
        training = source.for_training()
        model = session.load_base(training)
        reward_model = _load_reward_model(spec, session) if spec.reward_model and spec.reward_model_weight > 0 else None
    model = prepare_for_training(model, recipe.adapter, packed_attention=True,
                                 activation_checkpointing=recipe.train.activation_checkpointing,
                                 compute_dtype=session.compute_dtype)
    reference_model = None
    if recipe.adapter.method == "full":  # no adapter to switch off: the start needs a frozen copy
        reference_model = prepare_for_training(session.load_base(training),
                                               recipe.adapter, packed_attention=True, activation_checkpointing=False,
                                               compute_dtype=session.compute_dtype)
        session.place(reference_model).requires_grad_(False).eval()
    policy = Policy(model, session.compute_dtype, value_head=recipe.stage == "ppo").to(session.device)
    pad_id = tokenizer.pad_token_id
    objective = session.start(
        policy, Objective(policy, make_batch=lambda examples, device: tree_batch(examples, 4096, pad_id, device),
                          loss_terms=lambda example: 1),
        prompts, config,
        summary=f"{source.kind} model {recipe.model}, template {template.name}, {len(prompts)} prompts × "
                f"{spec.samples_per_prompt} answers a rollout, reward: " + _describe_reward(spec, recipe),
        template=template.name, model_source={"kind": source.kind, "folder": source.folder})

    reward = _reward_function(spec, rubric_reward, reward_model, session)
    sampler = Sampler(tokenizer, template, spec, pad_id, session.device)
    validate = _validation(session, policy, sampler, validation, reward)
    total_seconds, tokens, step = 0.0, 0, session.start_step
    if step == 0 and not dry_run:
        validate(0)
    with training_bar(session.total_steps) as bar, session.interrupts():
        task = bar.add_task("dry run" if dry_run else recipe.stage, total=session.total_steps, completed=step,
                            loss=float("nan"), tokens_per_s=0.0)
        for epoch in range(step // session.steps_per_epoch, recipe.train.epochs):
            for index, batch in enumerate(epoch_batches(len(prompts), recipe.train.batch_size, recipe.train.seed, epoch)):
                if epoch * session.steps_per_epoch + index < step:
                    continue
                if step >= session.total_steps:
                    break
                started = time.perf_counter()
                rollout = collect(policy, reference_model, sampler, [prompts[i] for i in batch], reward, session)
                sampled = time.perf_counter()
                stats = update(policy, rollout, spec, recipe.stage, session)
                elapsed = time.perf_counter() - started
                step += 1
                answer_tokens = int(rollout.owners.shape[0])
                tokens, total_seconds = tokens + answer_tokens, total_seconds + elapsed
                session.log({"step": step, "epoch": round(step / session.steps_per_epoch, 3), **stats,
                             "lr": session.scheduler.get_last_lr()[0], "answer_tokens": answer_tokens,
                             "rollout_tokens_per_s": answer_tokens / (sampled - started),
                             "update_tokens_per_s": answer_tokens * spec.update_epochs / (elapsed - (sampled - started)),
                             "samples": [{"prompt": prompts[batch[0]]["prompt"], "answer": a}
                                         for a in rollout.answers[:spec.samples_per_prompt][:2]]})
                bar.update(task, completed=step, loss=stats["loss"], tokens_per_s=tokens / total_seconds)
                _stop_if_drifting(stats["kl"], step, recipe, session)
                if dry_run:
                    continue
                if spec.validation_every and step % spec.validation_every == 0:
                    validate(step)
                epoch_done = index == session.steps_per_epoch - 1 or step == session.total_steps
                due = step % recipe.train.checkpoint_every == 0 if recipe.train.checkpoint_every else epoch_done
                if due or session.stop_requested():
                    session.checkpoint(step, epoch)
                if session.stop_requested():
                    session.stop(step)
    if dry_run:
        return session.report_dry_run(objective, 0, tokens, [total_seconds / max(step, 1)] * max(step, 1))
    if not (spec.validation_every and step % spec.validation_every == 0):
        validate(step)
    facts = session.run.validation_before_and_after()
    for name, values in facts.items():
        say(f"{name.replace('_', ' ')} on the validation prompts: {values['before']:.3f} before, "
            f"{values['after']:.3f} after training.")
    return session.finish(policy, source, tokens, total_seconds, step, **facts)


def _reward_function(spec: Any, rubric_reward: RubricReward | None, reward_model: Any,
                     session: Session) -> Callable[[list[dict[str, Any]], list[str]], torch.Tensor]:
    """The recipe's reward for a rollout's answers: the rubric's pass share and the reward model's score, weighted."""

    def reward(batches: list[dict[str, Any]], answers: list[str]) -> torch.Tensor:
        total = torch.zeros(len(answers))
        if rubric_reward is not None and spec.rubric_weight > 0:
            total += spec.rubric_weight * torch.tensor(rubric_reward(answers), dtype=torch.float32)
        if reward_model is not None:  # read at each answer's last token, in the rollout's answer order
            total += spec.reward_model_weight * torch.cat([_in_precision(session, lambda b: reward_model(**b), batch)
                                                           .float().cpu() for batch in batches])
        return total

    return reward


def _stop_if_drifting(kl: float, step: int, recipe: Recipe, session: Session) -> None:
    spec = getattr(recipe, recipe.stage)
    if spec.max_kl is not None and kl > spec.max_kl:
        raise TrainingDiverged(
            f"the mean KL to the start model reached {kl:.2f} at step {step}, past {recipe.stage}.max_kl "
            f"{spec.max_kl}: the policy is drifting away (often to exploit the reward). The last checkpoint in "
            f"{session.run.path / 'checkpoints'} is kept; raise {recipe.stage}.kl_coef or lower "
            "train.learning_rate, and resume with --resume or start again.")


def _describe_reward(spec: Any, recipe: Recipe) -> str:
    parts = []
    if spec.rubric_weight > 0 and recipe.eval.rubric:
        parts.append(f"{spec.rubric_weight:g} × rubric ({len(recipe.eval.rubric)} checks)")
    if spec.reward_model is not None and spec.reward_model_weight > 0:
        parts.append(f"{spec.reward_model_weight:g} × reward model {spec.reward_model}")
    return " + ".join(parts)


def _encode_prompts(path: Path, recipe: Recipe, tokenizer: Any, template: Any) -> list[dict[str, Any]]:
    """Prompts (chat JSONL whose last answer is dropped, or {"prompt": …} lines) as token ids ending with the
    generation cue; `input_ids` is sized with the longest answer, for the session's memory check."""
    prompts = []
    for item in read_questions(path, recipe.data.system):
        text = template(item["messages"], add_generation_prompt=True)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        keep = recipe.train.max_length // 2
        if len(ids) > keep:  # a long prompt keeps its first token (<bos>) and its end, as the preference stages do
            ids = ids[:1] + ids[-(keep - 1):]
        prompts.append({"prompt_ids": ids, "prompt": item["messages"][-1]["content"],
                        "input_ids": ids + [0] * getattr(recipe, recipe.stage).max_new_tokens})
    return prompts


class Sampler:
    """Answers sampled with the KV cache (transformers' generate), cut after the template's end-of-turn token."""

    def __init__(self, tokenizer: Any, template: Any, spec: Any, pad_id: int, device: Any) -> None:
        self.tokenizer, self.spec, self.pad_id, self.device = tokenizer, spec, pad_id, device
        self.stops = [s for s in stop_token_ids(tokenizer, template) if s is not None]

    @torch.no_grad()
    def __call__(self, causal_lm: Any, prompts: list[dict[str, Any]], samples: int,
                 greedy: bool = False) -> tuple[list[dict[str, Any]], list[str]]:
        rows = [p["prompt_ids"] for p in prompts for _ in range(samples)]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):  # left padding: every answer starts right after its prompt
            ids[i, width - len(row):] = torch.tensor(row)
            mask[i, width - len(row):] = 1
        was_training = causal_lm.training
        causal_lm.eval()
        sampling = sampling_settings(causal_lm, 0.0 if greedy else self.spec.temperature, self.spec.top_p)
        with generating():
            output = causal_lm.generate(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                                        max_new_tokens=self.spec.max_new_tokens, eos_token_id=self.stops,
                                        pad_token_id=self.pad_id, **sampling)
        causal_lm.train(was_training)
        new = output[:, width:].tolist()
        examples, texts = [], []
        for p, prompt in enumerate(prompts):
            branches = []
            for answer in new[p * samples:(p + 1) * samples]:
                cut = next((i + 1 for i, t in enumerate(answer) if t in self.stops), len(answer))
                answer = answer[:cut] or [self.stops[0]]
                branches.append(answer)
                texts.append(self.tokenizer.decode([t for t in answer if t not in self.stops],
                                                   skip_special_tokens=True).strip())
            ids_flat = prompt["prompt_ids"] + [t for b in branches for t in b]
            examples.append({"input_ids": ids_flat, "prompt": prompt["prompt"],
                             "labels": [IGNORE_INDEX] * len(prompt["prompt_ids"]) + [t for b in branches for t in b],
                             "branches": [len(prompt["prompt_ids"])] + [len(b) for b in branches]})
        return examples, texts


def _tree_batches(examples: list[dict[str, Any]], pad_id: int, session: Session) -> list[dict[str, Any]]:
    """A rollout's examples as tree batches of the session's micro-batch budget, built once and reused by every
    pass over the rollout (reward model, policy, reference, each update epoch), so their token order agrees."""
    budget = session.micro_batch_budget() or 4096
    return [tree_batch(part, 4096, pad_id, session.device) for part in split_by_tokens(examples, budget, packed=True)]


def _in_precision(session: Session, module: Callable[[dict[str, Any]], Any], batch: dict[str, Any]) -> Any:
    with torch.autocast(session.device.type, dtype=torch.bfloat16, enabled=session.bf16):
        return module(batch)


@torch.no_grad()
def collect(policy: Policy, reference_model: nn.Module | None, sampler: Sampler, prompts: list[dict[str, Any]],
            reward: Callable[[list[dict[str, Any]], list[str]], torch.Tensor],
            session: Session) -> Rollout:
    """Sample, reward, and take the policy's and the reference's log-probabilities (and values) of the answers."""
    examples, answers = sampler(policy.causal_lm, prompts, sampler.spec.samples_per_prompt)
    batches = _tree_batches(examples, sampler.pad_id, session)
    rewards = reward(batches, answers)
    policy.eval()
    old = [_in_precision(session, policy, batch) for batch in batches]
    if reference_model is None:
        scorer, adapter_off = policy.logprobs, policy.causal_lm.disable_adapter()
    else:
        scorer, adapter_off = AnswerLogProbs(reference_model, policy.logprobs.compute_dtype), contextlib.nullcontext()
    with adapter_off:
        reference = [_in_precision(session, lambda b: scorer.token_logps(**logprob_inputs(b))[0], batch)
                     for batch in batches]
    policy.train()
    offsets = [0]  # where each batch's answer numbering starts in the rollout's
    for batch in batches[:-1]:
        offsets.append(offsets[-1] + batch["last"].shape[0])
    # Everything per token or per answer lives on the training device, next to the log-probabilities it meets.
    return Rollout(batches, answers, rewards.to(session.device),
                   old_logps=torch.cat([logps.float() for logps, _ in old]),
                   reference_logps=torch.cat([logps.float() for logps in reference]),
                   owners=torch.cat([batch["owners"] + offset for batch, offset in zip(batches, offsets)]),
                   old_values=torch.cat([values for _, values in old]) if policy.value_head is not None else None)


def advantages_and_returns(rollout: Rollout, spec: Any, stage: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per answer token: the advantage (and, for ppo, the return the value head learns)."""
    owners, answers = rollout.owners, rollout.rewards.shape[0]
    if stage == "grpo":
        return group_advantages(rollout.rewards, spec.samples_per_prompt)[owners], None
    # ppo: −β·KL on every token, the reward on the last; GAE answer by answer.
    assert rollout.old_values is not None, "a ppo rollout carries the value head's estimates"
    token_rewards = -spec.kl_coef * kl_estimate(rollout.old_logps, rollout.reference_logps)
    advantages, returns = torch.zeros_like(token_rewards), torch.zeros_like(token_rewards)
    for answer in range(answers):
        where = (owners == answer).nonzero().squeeze(1)
        rewards = token_rewards[where].clone()
        rewards[-1] += rollout.rewards[answer]
        advantages[where], returns[where] = gae(rewards, rollout.old_values[where], spec.gamma, spec.gae_lambda)
    whitened = (advantages - advantages.mean()) / (advantages.std() + 1e-8) if advantages.numel() > 1 else advantages
    return whitened, returns


def update(policy: Policy, rollout: Rollout, spec: Any, stage: str, session: Session) -> dict[str, float]:
    """update_epochs optimizer passes over the rollout, micro-batched; the schedule advances once per rollout."""
    advantages, returns = advantages_and_returns(rollout, spec, stage)
    tokens = rollout.owners.shape[0]
    kl = kl_estimate(rollout.old_logps, rollout.reference_logps)
    for _ in range(spec.update_epochs):
        start = 0
        totals = {"policy_loss": 0.0, "value_loss": 0.0}  # of the last pass
        for batch in rollout.batches:
            logps, values = _in_precision(session, policy, batch)
            span = slice(start, start + logps.shape[0])
            start += logps.shape[0]
            loss = clipped_policy_loss(logps.float(), rollout.old_logps[span], advantages[span], spec.clip_range).sum()
            totals["policy_loss"] += loss.item()
            if stage == "grpo" and spec.kl_coef > 0:
                loss = loss + spec.kl_coef * kl_estimate(logps.float(), rollout.reference_logps[span], "k3").sum()
            if values is not None and rollout.old_values is not None and returns is not None:
                value_loss = clipped_value_loss(values, rollout.old_values[span], returns[span],
                                                spec.value_clip_range).sum()
                totals["value_loss"] += value_loss.item()
                loss = loss + spec.value_coef * value_loss
            session.accelerator.backward(loss / tokens)
        torch.nn.utils.clip_grad_norm_(session.parameters, session.spec.max_grad_norm)
        session.optimizer.step()
        session.optimizer.zero_grad(set_to_none=True)
    session.scheduler.step()
    stats = {"loss": (totals["policy_loss"] + getattr(spec, "value_coef", 0.0) * totals["value_loss"]) / tokens,
             "reward": rollout.rewards.mean().item(), "reward_std": rollout.rewards.std().item()
             if rollout.rewards.numel() > 1 else 0.0,
             "kl": (kl.sum() / rollout.rewards.shape[0]).item(),  # per answer, as InstructGPT reports it
             "entropy": -rollout.old_logps.mean().item(),  # estimated from the sampled tokens
             "policy_loss": totals["policy_loss"] / tokens, "answer_tokens": tokens / rollout.rewards.shape[0]}
    if stage == "ppo":
        stats["value_loss"] = totals["value_loss"] / tokens
    return stats


def _validation(session: Session, policy: Policy, sampler: Sampler, prompts: list[dict[str, Any]],
                reward: Callable[[list[dict[str, Any]], list[str]], torch.Tensor]) -> Callable[[int], None]:
    """Greedy answers to the validation prompts, their mean reward logged (nothing when there are none)."""
    def validate(step: int) -> None:
        if not prompts or not session.is_main:
            return
        examples, answers = [], []
        for start in range(0, len(prompts), 16):
            made, texts = sampler(policy.causal_lm, prompts[start:start + 16], 1, greedy=True)
            examples += made
            answers += texts
        value = reward(_tree_batches(examples, sampler.pad_id, session), answers).mean().item()
        session.log({"step": step, "val_reward": value, "val_samples": answers[:3]})
        say(f"{'before training' if step == 0 else f'step {step}'}: mean reward of greedy answers to "
            f"{len(prompts)} validation prompts {value:.3f}")

    return validate


def _load_reward_model(spec: Any, session: Session) -> nn.Module:
    from shitate.models.reward import RewardModel

    source = resolve(str(spec.reward_model))
    reward_model = RewardModel(load_model(source, dtype=session.base_dtype(source)))
    reward_model.load_head(source.adapter or Path(source.folder))
    from shitate.models.attention import use_packed_attention
    from shitate.models.precision import widen_arithmetic

    use_packed_attention(reward_model.causal_lm)
    widen_arithmetic(reward_model.causal_lm, session.compute_dtype)
    return reward_model.to(session.device).eval().requires_grad_(False)
