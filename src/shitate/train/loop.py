"""The one step loop every stage trains with: epochs of seeded batches, micro-batched steps, validation,
checkpoints and the interrupt, on a Session, with the stage's Objective.

Data order comes from the seed and the epoch alone, so a resumed run skips exactly the batches
it had done and sees no example twice in an epoch.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from shitate.data.collate import Example
from shitate.errors import TrainingDiverged
from shitate.memory import return_free_heap
from shitate.progress import say, training_bar
from shitate.train.session import Objective, Session


@dataclass
class Fitted:
    """What the loop did: steps reached, real tokens and seconds spent in training steps, validations."""

    steps: int
    tokens: int = 0
    seconds: float = 0.0
    step_seconds: list[float] = field(default_factory=list)
    validations: list[dict[str, float]] = field(default_factory=list)


def epoch_batches(count: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """Example indices of an epoch's steps, shuffled by the seed and the epoch."""
    order = torch.randperm(count, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
    return [order[i:i + batch_size] for i in range(0, count, batch_size)]


def fit(session: Session, objective: Objective, train_set: list[Example], validation_set: list[Example],
        validate_first: bool = False, on_step: Callable[[int], None] | None = None) -> Fitted:
    """Train until the recipe's epochs or max_steps; validate at each epoch's end; checkpoint as the recipe says."""
    spec = session.spec
    fitted = Fitted(steps=session.start_step)
    if validate_first and validation_set and session.start_step == 0 and not session.dry_run:
        _validate(session, objective, validation_set, fitted, epoch=0)
    with training_bar(session.total_steps) as bar, session.interrupts():
        task = bar.add_task("dry run" if session.dry_run else "training", total=session.total_steps,
                            completed=fitted.steps, loss=float("nan"), tokens_per_s=0.0)
        for epoch in range(fitted.steps // session.steps_per_epoch, spec.epochs):
            batches = epoch_batches(len(train_set), spec.batch_size, spec.seed, epoch)
            for index, batch in enumerate(batches):
                if epoch * session.steps_per_epoch + index < fitted.steps:
                    continue  # done before the checkpoint we resumed from
                if fitted.steps >= session.total_steps:
                    break
                started = time.perf_counter()
                loss, tokens, statistics = train_step(session, objective, [train_set[i] for i in batch])
                elapsed = time.perf_counter() - started
                fitted.steps += 1
                step = fitted.steps
                fitted.step_seconds.append(elapsed)
                fitted.tokens, fitted.seconds = fitted.tokens + tokens, fitted.seconds + elapsed
                if step % spec.log_every == 0:
                    session.log({"step": step, "epoch": round(step / session.steps_per_epoch, 3), "loss": loss,
                                 "lr": session.scheduler.get_last_lr()[0], "tokens_per_s": tokens / elapsed, **statistics})
                bar.update(task, completed=step, loss=loss, tokens_per_s=fitted.tokens / fitted.seconds)
                if session.dry_run:
                    continue
                if on_step is not None:
                    on_step(step)
                epoch_done = index == len(batches) - 1 or step == session.total_steps
                if epoch_done and validation_set:
                    _validate(session, objective, validation_set, fitted, epoch=epoch + 1)
                due = step % spec.checkpoint_every == 0 if spec.checkpoint_every else epoch_done
                if due or session.stop_requested():
                    session.checkpoint(step, epoch)
                if session.stop_requested():
                    session.stop(step)
    return fitted


def train_step(session: Session, objective: Objective,
               examples: list[Example]) -> tuple[float, int, dict[str, float]]:
    """One optimizer step over micro-batches; returns (mean loss per loss term, real tokens processed, the mean per
    loss term of each statistic the objective returns beside its loss: token accuracy, reward accuracy, margins)."""
    module, accelerator, device = objective.module, session.accelerator, session.device
    module.train()
    # Under a launcher each process takes its share of the step's examples and DDP averages the gradients. Each
    # share's loss is divided by the step's loss terms over all processes (times their number, which DDP's mean
    # divides back out), so the step is the one a single process takes on the whole batch, however unevenly the
    # answer tokens fall. A process left without examples (a short last batch) runs one at weight 0: every process
    # must take part in the gradient exchange.
    share = examples[accelerator.process_index::accelerator.num_processes]
    weight = 1.0 if share else 0.0
    share = share or examples[:1]
    terms = weight * sum(objective.loss_terms(e) for e in share)
    step_terms = terms
    if accelerator.num_processes > 1:
        step_terms = accelerator.reduce(torch.tensor(float(terms), device=device), "sum").item()
    divisor = step_terms / accelerator.num_processes
    total_loss, real_tokens, sums = torch.zeros((), device=device), 0, dict[str, torch.Tensor]()
    for chunk in session.micro_batches(share, objective.packed):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=session.bf16):
            loss_sum, _, *extra = module(**objective.make_batch(chunk, device))
            loss_sum = weight * loss_sum
        for name, value in (extra[0] if extra else {}).items():
            sums[name] = sums.get(name, 0.0) + weight * torch.as_tensor(value, device=device).detach().float()
        accelerator.backward(loss_sum / divisor)
        # The micro-batch's activations are free now: handing their pages back before the next one lowered kids_qa's
        # peak by 0.03-0.04 GB more than trimming once a step (within the noise of its speed, Xeon).
        return_free_heap()
        total_loss += loss_sum.detach()  # read once per step: on a GPU each .item() waits for the device
        real_tokens += sum(len(e["input_ids"]) for e in chunk)
    if accelerator.num_processes > 1:  # the logged loss is the whole step's, as one process would log it
        total_loss = accelerator.reduce(total_loss, "sum")
        sums = {name: accelerator.reduce(value, "sum") for name, value in sums.items()}
    loss = total_loss.item() / step_terms
    statistics = {name: value.item() / step_terms for name, value in sums.items()}
    if not math.isfinite(loss):  # before the update: the weights and the last checkpoint stay good
        session.optimizer.zero_grad(set_to_none=True)
        raise TrainingDiverged(f"the loss became {loss} at step {session.scheduler.last_epoch + 1}, so training stopped "
                               "before that step changed the weights. The last checkpoint in "
                               f"{session.run.path / 'checkpoints'} is good: lower train.learning_rate (now "
                               f"{session.spec.learning_rate}) and resume with --resume, or start again.")
    torch.nn.utils.clip_grad_norm_(session.parameters, session.spec.max_grad_norm)
    session.optimizer.step()
    session.scheduler.step()
    session.optimizer.zero_grad(set_to_none=True)
    return_free_heap()
    return loss, real_tokens, statistics


@torch.no_grad()
def validation_loss(session: Session, objective: Objective, examples: list[Example]) -> tuple[float, dict[str, float]]:
    """Mean loss per loss term over `examples`, in the same micro-batches as training (never more memory), and
    the mean per loss term of each statistic the objective's module returns beside its loss (accuracy, margin)."""
    module = objective.module
    was_training = module.training
    module.eval()
    total, count, sums = 0.0, 0, dict[str, float]()
    for chunk in validation_micro_batches(session, examples, objective.packed):
        with torch.autocast(session.device.type, dtype=torch.bfloat16, enabled=session.bf16):
            loss_sum, n, *extra = module(**objective.make_batch(chunk, session.device))
        total, count = total + loss_sum.item(), count + int(n)
        for name, value in (extra[0] if extra else {}).items():
            sums[name] = sums.get(name, 0.0) + float(value)
    module.train(was_training)
    return total / max(count, 1), {name: value / max(count, 1) for name, value in sums.items()}


def validation_micro_batches(session: Session, examples: list[Example], packed: bool) -> list[list[Example]]:
    """The micro-batches validation runs `examples` in: similar lengths together (less padding), each step's share
    cut as training cuts it (never more memory)."""
    ordered = sorted(examples, key=lambda e: len(e["input_ids"]))
    return [chunk for start in range(0, len(ordered), session.spec.batch_size)
            for chunk in session.micro_batches(ordered[start:start + session.spec.batch_size], packed)]


def _validate(session: Session, objective: Objective, examples: list[Example], fitted: Fitted, epoch: int) -> None:
    metrics = objective.validation_metrics(*validation_loss(session, objective, examples))
    fitted.validations.append(metrics)
    session.log({"step": fitted.steps, "epoch": epoch, **metrics})
    shown = ", ".join(f"{name.removeprefix('val_').replace('_', ' ')} {value:.4f}" for name, value in metrics.items())
    say(f"{'before training' if epoch == 0 else f'epoch {epoch}'}: validation {shown}")
