"""Supervised fine-tuning: chats in, an adapter (or full model) out; loss on the answers only.

Reads top to bottom: run folder → model and template → data → adapter and optimizer →
train (with validation each epoch and atomic checkpoints) → save. The loop is ours
(about a page) because exact resume, answer-only chunked loss and a progress bar that
shows real tokens/s are simpler to keep right here than to bend a generic Trainer to;
accelerate supplies the device, mixed precision and multi-GPU wrapping.
"""

from __future__ import annotations

import contextlib
import math
import shutil
import signal
import tempfile
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from shitate.config import CPU_MICRO_BATCH_TOKENS, Recipe
from shitate.data.collate import pack_batch, pad_batch, split_by_tokens
from shitate.data.formats import conversation, read_chat
from shitate.data.templates import IGNORE_INDEX, encode_chat, end_marker_is_one_token, get_template
from shitate.errors import ConfigError, DataError, Problem
from shitate.models.adapters import attach, count_parameters, trainable_state
from shitate.models.attention import use_packed_attention
from shitate.models.inference import LoadedModel
from shitate.models.lean import make_lean
from shitate.models.load import load_config, load_model, load_tokenizer, pick_precision, resolve
from shitate.memory import (available_bytes, bound_kernel_caches, peak_rss_bytes, release_memory, return_free_heap,
                            training_bytes)
from shitate.progress import say, status, training_bar
from shitate.train import checkpoints, curves, rundir
from shitate.train.losses import AnswerLoss


def run(recipe: Recipe, out: Path | None = None, resume: bool = False, force: bool = False, dry_run: bool = False,
        answers_check: Callable[[LoadedModel], dict[str, float]] | None = None) -> Path:
    """Train `recipe`; return the run folder. A dry run trains two steps in a scratch folder and reports.

    `answers_check`, when given, scores the model as it trains every `eval.every_steps` steps (the
    caller brings it from the evals stage, so training does not depend on evaluation).
    """
    from accelerate import Accelerator
    from transformers import get_scheduler

    bound_kernel_caches()
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    if dry_run:
        run_dir, resume, force = Path(tempfile.mkdtemp(prefix="shitate-dry-run-")), False, True
    else:
        run_dir = Path(out) if out else Path("runs") / recipe.name
    # One process owns the run folder; the others wait until it is ready.
    resume_from = rundir.prepare(run_dir, recipe, resume, force) if accelerator.is_main_process else None
    accelerator.wait_for_everyone()
    if resume and not accelerator.is_main_process:
        resume_from = (checkpoints.checkpoint_dirs(run_dir) or [None])[-1]
    spec = recipe.train
    torch.manual_seed(spec.seed)
    device = accelerator.device
    precision = pick_precision(spec.precision, device.type)
    bf16 = precision == "bf16"

    with status(f"Loading {recipe.model} and the data…"):
        source = resolve(recipe.model)
        tokenizer = load_tokenizer(source)
        config = load_config(source)
        template = get_template(recipe.template, tokenizer, config.model_type)
        if not end_marker_is_one_token(tokenizer, template):
            say(f"[yellow]warning:[/] this tokenizer does not know {template.end_of_turn!r} as one token, so the "
                f"{template.name} template's turns may blur into each other; prefer the model's own template (auto).")
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        train_set = _encode(recipe.data.train, recipe, tokenizer, template)
        validation_set = _encode(recipe.data.validation, recipe, tokenizer, template) if recipe.data.validation else []
        del tokenizer  # a 262k-word tokenizer holds ~0.4 GB that training does not need
        release_memory()
        # A frozen base can live in bf16 (half the memory, no per-step casts); a fully trained one keeps fp32 masters.
        base_dtype = torch.bfloat16 if bf16 and recipe.adapter.method != "full" else torch.float32
        model = load_model(source, dtype=base_dtype)
    if spec.packing:
        use_packed_attention(model)
    model = attach(model, recipe.adapter)
    make_lean(model)
    if spec.activation_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    trainable, total = count_parameters(model)
    _check_memory(recipe, config, precision, device.type, train_set, trainable)

    steps_per_epoch = math.ceil(len(train_set) / spec.batch_size)
    planned_steps = min(spec.max_steps or 10**12, steps_per_epoch * spec.epochs)
    total_steps = min(planned_steps, 2) if dry_run else planned_steps
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=spec.learning_rate, weight_decay=spec.weight_decay)
    scheduler = get_scheduler(spec.lr_scheduler, optimizer, num_warmup_steps=round(spec.warmup_ratio * planned_steps),
                              num_training_steps=planned_steps)

    step = 0
    if resume_from is not None:
        step = checkpoints.load_checkpoint(resume_from, model, optimizer, scheduler)["step"]
        if accelerator.is_main_process:
            curves.truncate_metrics(run_dir / "metrics.jsonl", step)
        say(f"Resuming {run_dir} from {resume_from.name}.")
    loss_model = AnswerLoss(model, compute_dtype=torch.bfloat16 if bf16 else torch.float32)
    loss_model, optimizer = accelerator.prepare(loss_model, optimizer)

    say(f"[bold]{recipe.name}[/]: {source.kind} model {recipe.model}, template {template.name}, {precision}, "
        f"{recipe.adapter.method} ({trainable:,} of {total:,} parameters trained), {len(train_set)} train / "
        f"{len(validation_set)} validation examples, {planned_steps} steps on {device}.")
    if accelerator.is_main_process:
        rundir.write_manifest(run_dir, recipe, template=template.name, precision=precision, device=str(device),
                              model_source={"kind": source.kind, "folder": source.folder}, processes=accelerator.num_processes,
                              parameters={"trainable": trainable, "total": total}, total_steps=planned_steps)

    metrics_path = run_dir / "metrics.jsonl"
    checker: LoadedModel | None = None  # the model as it trains, for eval.every_steps; made on first use
    step_seconds: list[float] = []
    tokens_seen, seconds_training = 0, 0.0
    with training_bar(total_steps) as bar, _interrupt_requests() as stop_requested:
        task = bar.add_task("dry run" if dry_run else "training", total=total_steps, completed=step,
                            loss=float("nan"), tokens_per_s=0.0)
        for epoch in range(step // steps_per_epoch, spec.epochs):
            order = torch.randperm(len(train_set), generator=torch.Generator().manual_seed(spec.seed + epoch)).tolist()
            batches = [order[i:i + spec.batch_size] for i in range(0, len(order), spec.batch_size)]
            for index, batch in enumerate(batches):
                if epoch * steps_per_epoch + index < step:
                    continue  # done before the checkpoint we resumed from
                if step >= total_steps:
                    break
                started = time.perf_counter()
                loss, tokens = _train_step(loss_model, accelerator, optimizer, scheduler, parameters, spec,
                                           [train_set[i] for i in batch], pad_id, device, bf16)
                step += 1
                elapsed = time.perf_counter() - started
                step_seconds.append(elapsed)
                tokens_seen, seconds_training = tokens_seen + tokens, seconds_training + elapsed
                record = {"step": step, "epoch": round(step / steps_per_epoch, 3), "loss": loss,
                          "lr": scheduler.get_last_lr()[0], "tokens_per_s": tokens / elapsed}
                if step % spec.log_every == 0 and accelerator.is_main_process:
                    curves.append_metrics(metrics_path, record)
                bar.update(task, completed=step, loss=loss, tokens_per_s=tokens_seen / seconds_training)
                if dry_run:
                    continue
                if answers_check and recipe.eval.every_steps and step % recipe.eval.every_steps == 0 \
                        and accelerator.is_main_process:
                    checker = checker or LoadedModel(recipe.model, accelerator.unwrap_model(loss_model).causal_lm,
                                                     load_tokenizer(source), template, source)
                    checker.model.eval()
                    scores = answers_check(checker)
                    checker.model.train()
                    curves.append_metrics(metrics_path, {"step": step, **scores})
                    say(f"step {step}: " + ", ".join(f"{k} {v:.2f}" for k, v in scores.items()))
                epoch_done = index == len(batches) - 1 or step == total_steps
                if epoch_done and validation_set:
                    val_loss = _validation_loss(loss_model, validation_set, spec, pad_id, device, bf16)
                    if accelerator.is_main_process:
                        curves.append_metrics(metrics_path, {"step": step, "epoch": epoch + 1, "val_loss": val_loss})
                    say(f"epoch {epoch + 1}: validation loss {val_loss:.4f}")
                due = step % spec.checkpoint_every == 0 if spec.checkpoint_every else epoch_done
                if (due or stop_requested()) and accelerator.is_main_process:
                    checkpoints.save_checkpoint(run_dir, step, trainable_state(model), optimizer, scheduler,
                                                {"epoch": epoch}, keep=spec.keep_checkpoints)
                if stop_requested():
                    say(f"Stopped at step {step}; checkpoint saved. Continue with: "
                        f"shitate train RECIPE --resume --out {run_dir}")
                    raise SystemExit(130)

    if dry_run:
        shutil.rmtree(run_dir, ignore_errors=True)
        _report_dry_run(recipe, config, precision, device.type, train_set, validation_set, tokens_seen, step_seconds,
                        trainable)
        return run_dir
    if accelerator.is_main_process:
        curves.plot_loss(metrics_path, run_dir / "loss.png")
        _save_final(accelerator.unwrap_model(loss_model).causal_lm, source, recipe, run_dir)
        rundir.write_manifest(run_dir, recipe, finished=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                              steps=step, train_tokens_per_s=round(tokens_seen / max(seconds_training, 1e-9), 1),
                              peak_rss_gb=round(peak_rss_bytes() / 1e9, 2))
    say(f"Done: {run_dir} (adapter, metrics.jsonl, loss.png).")
    return run_dir


def micro_batches(examples: list[dict[str, list[int]]], spec: Any, device_type: str) -> list[list[dict[str, list[int]]]]:
    """A step's examples in grad_accum groups, each cut further to micro_batch_tokens if set."""
    size = math.ceil(len(examples) / spec.grad_accum)
    groups = [examples[i:i + size] for i in range(0, len(examples), size)]
    budget = micro_batch_budget(spec, device_type)
    if budget:
        groups = [part for group in groups for part in split_by_tokens(group, budget, packed=spec.packing is not False)]
    return groups


def micro_batch_budget(spec: Any, device_type: str) -> int | None:
    """Tokens per micro-batch: the recipe's number, or for auto a CPU default (GPUs take whole steps)."""
    if spec.micro_batch_tokens == "auto":
        return CPU_MICRO_BATCH_TOKENS if device_type == "cpu" else None
    return spec.micro_batch_tokens


def _micro_batch_tokens(spec: Any, examples: list[dict[str, list[int]]], device_type: str) -> int:
    """The most tokens one micro-batch can hold: padded to its longest, or packed end to end."""
    micro = math.ceil(spec.batch_size / spec.grad_accum)
    longest = sorted((len(e["input_ids"]) for e in examples), reverse=True)[:micro]
    padded = micro * longest[0]
    budget = micro_batch_budget(spec, device_type)
    if budget:
        padded = max(longest[0], min(padded, budget))
    return min(padded, sum(longest)) if spec.packing is True else padded


def _check_memory(recipe: Recipe, config: Any, precision: str, device: str, examples: list[dict[str, list[int]]],
                  trainable: int) -> None:
    """Refuse a run that would not fit, before it spends any time."""
    spec = recipe.train
    needed = training_bytes(config, precision, _micro_batch_tokens(spec, examples, device), trainable,
                            recipe.adapter.method == "full", loss_chunk=AnswerLoss.chunk_size,
                            checkpointing=spec.activation_checkpointing)
    free = available_bytes(device)
    if needed > free:
        raise ConfigError(
            f"this run needs about {needed / 1e9:.1f} GB more memory but {free / 1e9:.1f} GB is free on {device}. "
            f"Lower train.micro_batch_tokens (now {spec.micro_batch_tokens}) to split each step into smaller passes, "
            f"or train.batch_size (now {spec.batch_size}) or train.max_length (now {spec.max_length}); "
            "`shitate train RECIPE --dry-run` measures a setting in two steps.")


def _report_dry_run(recipe: Recipe, config: Any, precision: str, device_type: str, train_set: list[dict[str, list[int]]],
                    validation_set: list[dict[str, list[int]]], tokens: int, step_seconds: list[float],
                    trainable: int) -> None:
    """Measured speed and memory of the first steps, and what the whole run would take."""
    spec = recipe.train
    # The first step pays one-off costs (allocations, kernel choice); judge speed by the steps after it.
    measured = step_seconds[1:] or step_seconds
    per_step = sum(measured) / len(measured)
    tokens_per_s = tokens / sum(step_seconds)
    steps = min(spec.max_steps or 10**12, math.ceil(len(train_set) / spec.batch_size) * spec.epochs)
    validation_tokens = sum(len(e["input_ids"]) for e in validation_set) * spec.epochs
    projected = steps * per_step + validation_tokens / (3 * tokens_per_s)  # no backward pass in validation
    estimate = training_bytes(config, precision, _micro_batch_tokens(spec, train_set, device_type), trainable,
                              recipe.adapter.method == "full", loss_chunk=AnswerLoss.chunk_size,
                              checkpointing=spec.activation_checkpointing)
    say(f"Dry run of {recipe.name} ({len(step_seconds)} steps, {precision}):\n"
        f"  speed          {tokens_per_s:,.0f} tokens/s ({per_step:.2f} s a step)\n"
        f"  peak memory    {peak_rss_bytes() / 1e9:.2f} GB resident (estimated training share {estimate / 1e9:.2f} GB)\n"
        f"  whole run      {steps} steps, about {_duration(projected)} including validation")


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min" if hours else f"{minutes} min {secs:02d} s"


def _encode(path: Path, recipe: Recipe, tokenizer: Any, template: Any) -> list[dict[str, list[int]]]:
    examples, problems = [], []
    for number, record in enumerate(read_chat(path), start=1):
        messages = conversation(record, recipe.data.system)
        if messages[-1]["role"] != "assistant":
            problems.append(Problem(path, number, "messages", "does not end with an assistant turn",
                                    "run `shitate data check` on the file"))
            continue
        example = encode_chat(messages, tokenizer, template, recipe.train.max_length)
        if all(label == IGNORE_INDEX for label in example["labels"][1:]):
            problems.append(Problem(path, number, None, f"no answer tokens left within max_length {recipe.train.max_length}",
                                    "raise train.max_length or shorten the prompt"))
            continue
        examples.append(example)
    if problems:
        raise DataError(problems)
    return examples


def make_batch(examples: list[dict[str, list[int]]], spec: Any, pad_id: int, device: Any) -> dict[str, Any]:
    """Packed rows when the recipe packs, else a padded batch."""
    lengths = [len(e["input_ids"]) for e in examples]
    # Packing computes attention example by example; for batches of similar lengths one padded call is cheaper.
    wasteful = len(lengths) * max(lengths) > 1.1 * sum(lengths)
    if spec.packing is True or (spec.packing == "auto" and wasteful):
        return pack_batch(examples, spec.pack_length, pad_id, device)
    return pad_batch(examples, pad_id, device)


def _train_step(loss_model: Any, accelerator: Any, optimizer: Any, scheduler: Any, parameters: list[Any], spec: Any,
                examples: list[dict[str, list[int]]], pad_id: int, device: Any, bf16: bool) -> tuple[float, int]:
    """One optimizer step over micro-batches; returns (mean answer loss, real tokens processed)."""
    loss_model.train()
    # Under accelerate launch each process takes its share of the step's examples; DDP averages the gradients.
    examples = examples[accelerator.process_index::accelerator.num_processes] or examples[:1]
    answer_tokens = sum(sum(1 for label in e["labels"][1:] if label != IGNORE_INDEX) for e in examples)
    total_loss, real_tokens = torch.zeros((), device=device), 0
    for chunk in micro_batches(examples, spec, device.type):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss_sum, _ = loss_model(**make_batch(chunk, spec, pad_id, device))
        accelerator.backward(loss_sum / answer_tokens)
        total_loss += loss_sum.detach()  # read once per step: on a GPU each .item() waits for the device
        real_tokens += sum(len(e["input_ids"]) for e in chunk)
    torch.nn.utils.clip_grad_norm_(parameters, spec.max_grad_norm)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return_free_heap()
    return total_loss.item() / answer_tokens, real_tokens


@torch.no_grad()
def _validation_loss(loss_model: Any, examples: list[dict[str, list[int]]], spec: Any, pad_id: int, device: Any,
                     bf16: bool) -> float:
    loss_model.eval()
    ordered = sorted(examples, key=lambda e: len(e["input_ids"]))  # similar lengths together: less padding
    total, count = 0.0, 0
    for start in range(0, len(ordered), spec.batch_size):
        # The same micro-batches as training, so validation never needs more memory than a step.
        for chunk in micro_batches(ordered[start:start + spec.batch_size], spec, device.type):
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                loss_sum, n = loss_model(**make_batch(chunk, spec, pad_id, device))
            total, count = total + loss_sum.item(), count + int(n)
    return total / max(count, 1)


def _save_final(model: Any, source: Any, recipe: Recipe, run_dir: Path) -> None:
    """adapter/ (LoRA) or model/ (full), written to a temp folder and renamed into place."""
    import os

    target = run_dir / ("model" if recipe.adapter.method == "full" else "adapter")
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation("sdpa")  # packed attention is a training device; the saved model is plain
    staging = Path(tempfile.mkdtemp(dir=run_dir, prefix=f".{target.name}."))
    try:
        model.save_pretrained(staging, safe_serialization=True)
        if recipe.adapter.method == "full":
            load_tokenizer(source).save_pretrained(staging)
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


@contextlib.contextmanager
def _interrupt_requests() -> Iterator[Callable[[], bool]]:
    """First Ctrl-C: finish the step, checkpoint and stop. Second: stop at once."""
    requested = {"stop": False}

    def handler(signum: int, frame: Any) -> None:
        if requested["stop"]:
            raise KeyboardInterrupt
        requested["stop"] = True
        say("[yellow]Stopping after this step and saving a checkpoint (Ctrl-C again to abort now)…")

    try:
        previous = signal.signal(signal.SIGINT, handler)
    except ValueError:  # not the main thread: leave signals alone
        previous = None
    try:
        yield lambda: requested["stop"]
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
