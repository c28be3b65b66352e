"""The training session every stage runs in; the stage brings a model, its examples and an Objective.

A session owns what is the same for every stage: the run folder (created, resumed, never
overwritten without --force), accelerate (device, data-parallel wrapping), precision, the
optimizer and schedule, checkpoints with every random state, the interrupt request, metrics,
the memory check before a run starts, and the dry-run report. The step loop that drives it is
`train/loop.py`; a stage (`train/sft.py`, `train/pretrain.py`) reads top to bottom and calls both.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import random
import signal
import tempfile
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from shitate.config import CPU_MICRO_BATCH_TOKENS, Recipe, TrainSpec
from shitate.data.collate import Example, split_by_tokens
from shitate.errors import ConfigError, DataError, Problem, TrainingInterrupted
from shitate.memory import (
    ENGINES,
    available_bytes,
    bound_kernel_caches,
    peak_gpu_bytes,
    peak_rss_bytes,
    per_device_bytes,
    training_bytes,
)
from shitate.models.adapters import check_supported, count_parameters, trainable_state
from shitate.models.attention import use_plain_attention
from shitate.models.load import ModelSource, learned_position_limit, load_config, load_model, load_tokenizer
from shitate.models.logprobs import loss_workspace_bytes
from shitate.models.precision import bf16_supported, frozen_base_dtype, pick_precision
from shitate.progress import say
from shitate.runs import RunFolder, file_digest, weight_digests


@dataclass
class Objective:
    """What a stage contributes to the shared loop.

    `module(**make_batch(examples, device))` returns (summed loss, number of loss terms) for one
    micro-batch, and optionally a third item, a dict of statistics summed over the loss terms
    (validation reports their means: pairwise accuracy, reward margin); it is what accelerate
    wraps, so data-parallel gradients sync as usual. A step's loss is the sum over its
    micro-batches divided by the loss terms of all its examples.
    """

    module: torch.nn.Module
    make_batch: Callable[[list[Example], Any], dict[str, Any]]
    loss_terms: Callable[[Example], int]
    packed: bool = True  # micro-batches are sized by tokens end to end (packed) or count × longest (padded)
    validation_metrics: Callable[..., dict[str, float]] = field(
        default=lambda loss, stats: {"val_loss": loss, **{f"val_{name}": value for name, value in stats.items()}})


class Session:
    """One run of one stage: set up with the recipe, driven by `loop.fit`, closed with `finish`."""

    def __init__(self, recipe: Recipe, out: Path | None = None, resume: bool = False, force: bool = False,
                 dry_run: bool = False) -> None:
        from accelerate import Accelerator

        bound_kernel_caches()
        self.recipe, self.spec, self.dry_run = recipe, recipe.train, dry_run
        self.accelerator = Accelerator(cpu=not torch.cuda.is_available())
        self.device = self.accelerator.device
        check_supported(recipe.adapter, self.device.type)  # before anything is written or loaded
        self.precision, self.precision_said = pick_precision(self.spec.precision, self.device.type)
        self.bf16 = self.precision == "bf16"
        self.compute_dtype = torch.bfloat16 if self.bf16 else torch.float32
        if dry_run:
            self.run = RunFolder(tempfile.mkdtemp(prefix="shitate-dry-run-"))
            resume, force = False, True
        else:
            self.run = RunFolder(out or Path("runs") / recipe.name)
        # Checked now, changed in start(): a mistake found while reading the data must not cost the old run.
        self.resume, self.resume_from = resume, self.run.check_start(recipe, resume, force) if self.is_main else None
        torch.manual_seed(self.spec.seed)
        random.seed(self.spec.seed)
        self.start_step = 0
        self.stop_requested: Callable[[], bool] = lambda: False

    def check_positions(self, config: Any) -> None:
        """Refuse, before the weights load, sequences longer than a model with learned positions has (GPT-2's
        n_positions): the first long example stopped training with an IndexError from inside torch."""
        limit = learned_position_limit(config)
        if limit is None:
            return
        recipe = self.recipe
        if recipe.stage == "pretrain":
            longest, setting = recipe.pretrain.block_size, "pretrain.block_size"
        elif recipe.stage in ("ppo", "grpo"):  # a prompt keeps half of max_length, then the answer
            longest = recipe.train.max_length // 2 + getattr(recipe, recipe.stage).max_new_tokens
            setting = f"train.max_length / 2 + {recipe.stage}.max_new_tokens"
        else:
            longest, setting = recipe.train.max_length, "train.max_length"
        if longest > limit:
            raise ConfigError(f"{setting} makes sequences of up to {longest} tokens, but {recipe.model} has learned "
                              f"positions for {limit} tokens only (its position table has no row past them); lower "
                              f"it to {limit} or less.")

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    # --- before the loop ------------------------------------------------------------------------
    def load_base(self, source: ModelSource) -> torch.nn.Module:
        """The model to train from, in `base_dtype`; under qlora its linear layers in 4-bit NF4, computing in the
        session's arithmetic."""
        return load_model(source, dtype=self.base_dtype(source), four_bit=self.recipe.adapter.method == "qlora",
                          compute_dtype=self.compute_dtype)

    def base_dtype(self, source: ModelSource) -> torch.dtype:
        """The dtype to load `source` in: a frozen base in 16 bits where the arithmetic or its file allows
        (models/precision.py), a fully trained one in fp32 masters. Under qlora, the layers left unquantised (the
        embedding, the norms): a 262k-word embedding in fp32 would take back much of what 4 bits save."""
        config = load_config(source)
        stored = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
        if source.merged:  # an earlier run's adapter is folded into the weights: 16 bits would round part of it away
            stored = torch.float32
        return frozen_base_dtype(self.precision, stored, full_fine_tune=self.recipe.adapter.method == "full")

    def place(self, module: torch.nn.Module) -> torch.nn.Module:
        """Move a module to the training device now, for work done before `start` (a stage's reference
        log-probabilities); a 4-bit base is already where bitsandbytes put it and cannot be moved."""
        if getattr(module, "hf_device_map", None) is None:
            module.to(self.device)
        return module

    def start(self, model: torch.nn.Module, objective: Objective, train_set: list[Example], config: Any,
              summary: str, **manifest_facts: Any) -> Objective:
        """Check memory, build optimizer and schedule, restore a checkpoint, wrap for the device; return the
        objective with its module ready to train."""
        # A multimodal checkpoint (Gemma 3 from 4B up) keeps the language model's sizes in its text config.
        self.model, self.config, self.train_set = model, config.get_text_config(), train_set
        self.trainable, self.total = count_parameters(model)
        self._check_memory(objective)
        # One process owns the run folder; the others wait until it is ready.
        if self.is_main and not self.resume:
            self.run.create(self.recipe)
        self.accelerator.wait_for_everyone()
        if self.resume and not self.is_main:
            self.resume_from = self.run.latest_checkpoint()
        self.steps_per_epoch = math.ceil(len(train_set) / self.spec.batch_size)
        self.planned_steps = min(self.spec.max_steps or 10**12, self.steps_per_epoch * self.spec.epochs)
        self.total_steps = min(self.planned_steps, 2) if self.dry_run else self.planned_steps
        self.parameters = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = self._optimizer(model)
        self.scheduler = self._scheduler()
        if self.resume:
            self.start_step = self._restore_newest_readable()
            if self.is_main:
                self.run.clear_leftovers()
                self.run.forget_metrics_after(self.start_step)
        module, self.optimizer = self.accelerator.prepare(objective.module, self.optimizer)
        say(f"[bold]{self.recipe.name}[/]: {summary}, {self.precision_said}, {self.recipe.adapter.method} "
            f"({self.trainable:,} of {self.total:,} parameters trained), {self.planned_steps} steps on {self.device}.")
        if self.is_main:
            source = manifest_facts.get("model_source")
            if source and not self.run.manifest().get("model_source", {}).get("weights"):
                manifest_facts["model_source"] = {**source, "weights": weight_digests(source)}
            self.run.write_manifest(self.recipe, precision=self.precision, device=str(self.device),
                                    processes=self.accelerator.num_processes,
                                    parameters={"trainable": self.trainable, "total": self.total},
                                    total_steps=self.planned_steps, **manifest_facts)
        return dataclasses.replace(objective, module=module)

    def _optimizer(self, model: Any) -> torch.optim.Optimizer:
        adapter = self.recipe.adapter
        if adapter.method == "loraplus":
            # PEFT's LoRA+ optimizer: the same AdamW, with B matrices in a group of ratio × the learning rate.
            from peft.optimizers import create_loraplus_optimizer

            return create_loraplus_optimizer(model, torch.optim.AdamW, lr=self.spec.learning_rate,
                                             loraplus_lr_ratio=adapter.loraplus_ratio,
                                             weight_decay=self.spec.weight_decay)
        return torch.optim.AdamW(self.parameters, lr=self.spec.learning_rate, weight_decay=self.spec.weight_decay)

    def _scheduler(self) -> Any:
        from transformers import get_scheduler

        return get_scheduler(self.spec.lr_scheduler, self.optimizer,
                             num_warmup_steps=round(self.spec.warmup_ratio * self.planned_steps),
                             num_training_steps=self.planned_steps)

    # --- micro-batches and memory ---------------------------------------------------------------
    def micro_batch_budget(self) -> int | None:
        """Tokens per micro-batch: the recipe's number, or for auto a CPU default (GPUs take whole steps)."""
        if self.spec.micro_batch_tokens == "auto":
            return CPU_MICRO_BATCH_TOKENS if self.device.type == "cpu" else None
        return self.spec.micro_batch_tokens

    def micro_batches(self, examples: list[Example], packed: bool) -> list[list[Example]]:
        """A step's examples in grad_accum groups, each cut further to the micro-batch budget if there is one."""
        size = math.ceil(len(examples) / self.spec.grad_accum)
        groups = [examples[i:i + size] for i in range(0, len(examples), size)]
        budget = self.micro_batch_budget()
        if budget:
            groups = [part for group in groups for part in split_by_tokens(group, budget, packed=packed)]
        return groups

    def _largest_micro_batch(self, examples: list[Example], packed: bool) -> int:
        """The most tokens one micro-batch can hold: padded to its longest, or end to end."""
        micro = math.ceil(self.spec.batch_size / self.spec.grad_accum)
        longest = sorted((len(e["input_ids"]) for e in examples), reverse=True)[:micro]
        padded = micro * longest[0]
        budget = self.micro_batch_budget()
        if budget:
            padded = max(longest[0], min(padded, budget))
        return min(padded, sum(longest)) if packed else padded

    def _training_bytes(self, objective: Objective, precision: str | None = None) -> int:
        return training_bytes(self.config, precision or self.precision,
                              self._largest_micro_batch(self.train_set, objective.packed),
                              self.trainable, self.recipe.adapter.method == "full",
                              loss_workspace=loss_workspace_bytes(self.device, self.config.hidden_size),
                              checkpointing=self.spec.activation_checkpointing)

    def _check_memory(self, objective: Objective) -> None:
        """Refuse a run that would not fit, before it spends any time."""
        needed, free = self._training_bytes(objective), available_bytes(self.device.type)
        if needed > free:
            spec = self.spec
            narrower = ""
            if spec.precision == "auto" and self.precision == "fp32" and bf16_supported(self.device.type):
                # auto took fp32 for speed; bf16 halves the activations, the part of the estimate that grows
                narrower = (f", or set train.precision: bf16 (auto chose fp32 as this CPU's faster arithmetic; bf16 "
                            f"needs about {self._training_bytes(objective, 'bf16') / 1e9:.1f} GB)")
            raise ConfigError(
                f"this run needs about {needed / 1e9:.1f} GB more memory but {free / 1e9:.1f} GB is free on "
                f"{self.device.type}. Lower train.micro_batch_tokens (now {spec.micro_batch_tokens}) to split each "
                f"step into smaller passes, or train.batch_size (now {spec.batch_size}) or train.max_length "
                f"(now {spec.max_length}){narrower}; `shitate train RECIPE --dry-run` measures a setting in two steps.")

    # --- during the loop ------------------------------------------------------------------------
    def log(self, record: dict[str, Any]) -> None:
        if self.is_main:
            self.run.append_metrics(record)

    def checkpoint(self, step: int, epoch: int) -> None:
        """Save everything needed to continue exactly from `step`, random states included."""
        if not self.is_main:
            return
        state = {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                 "random": random_states()}
        self.run.save_checkpoint(step, trainable_state(self.model), state, {"epoch": epoch},
                                 keep=self.spec.keep_checkpoints)

    def _restore_newest_readable(self) -> int:
        """Restore the newest checkpoint that reads back whole; a damaged one (a disk fault, a power cut before
        its data reached the disk) is skipped with a warning. The step restored; 0 when there is none."""
        for folder in reversed(self.run.checkpoints()):
            try:
                saved = self.run.read_checkpoint(folder)
            # Any failure to read our own files means damage: safetensors, pickle and JSON each raise their own.
            except Exception as err:  # noqa: BLE001
                say(f"[yellow]warning:[/] {folder} is damaged ({type(err).__name__}: {str(err)[:120]}); using the "
                    "checkpoint before it.")
                continue
            step = self._restore(folder, *saved)
            say(f"Resuming {self.run.path} from {folder.name}.")
            return step
        if self.resume_from is not None:
            say(f"[yellow]warning:[/] no checkpoint of {self.run.path} reads back; starting again from step 0.")
        return 0

    def _restore(self, folder: Path, tensors: dict[str, Any], state: dict[str, Any], progress: dict[str, Any]) -> int:
        parameters = dict(self.model.named_parameters())
        missing = [name for name in tensors if name not in parameters]
        if missing:
            raise ConfigError(f"{folder}: checkpoint tensors {missing[:3]} are not in the model; was it written by "
                              "another recipe? Start again with --force.")
        with torch.no_grad():
            for name, tensor in tensors.items():
                parameters[name].copy_(tensor)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        restore_random_states(state["random"])
        return int(progress["step"])

    @contextlib.contextmanager
    def interrupts(self) -> Iterator[None]:
        """First Ctrl-C: finish the step, checkpoint and stop. Second: stop at once."""
        requested = {"stop": False}

        def handler(signum: int, frame: Any) -> None:
            if requested["stop"]:
                raise KeyboardInterrupt
            requested["stop"] = True
            say("[yellow]Stopping after this step and saving a checkpoint (Ctrl-C again to abort now)…")

        try:
            previous = signal.signal(signal.SIGINT, handler)
            self.stop_requested = lambda: requested["stop"]
        except ValueError:  # not the main thread (the web UI trains in one): its Stop button calls request_stop
            previous = None
            self.stop_requested = _stop_request.is_set
        try:
            yield
        finally:
            if previous is not None:
                signal.signal(signal.SIGINT, previous)

    def stop(self, step: int) -> None:
        raise TrainingInterrupted(f"Stopped at step {step}; checkpoint saved. Continue with: "
                                  f"shitate train RECIPE --resume --out {self.run.path}")

    # --- after the loop -------------------------------------------------------------------------
    def finish(self, model: Any, source: ModelSource, tokens: int, seconds: float, steps: int,
               **facts: Any) -> Path:
        """Loss plot, final weights (adapter/, or model/ with its tokenizer; written atomically), closing manifest."""
        kind = "model" if self.recipe.adapter.method == "full" else "adapter"
        if self.is_main:
            self.run.plot_loss()
            if hasattr(model, "set_attn_implementation"):
                use_plain_attention(model)  # packed attention is a training device; the saved model is plain

            def save(folder: Path) -> None:
                model.save_pretrained(folder, safe_serialization=True)
                if kind == "model":
                    load_tokenizer(source).save_pretrained(folder)

            self.run.publish_final(kind, save)
            facts["outputs"] = {kind: file_digest(self.run.path / kind)}
            if (gpu := peak_gpu_bytes()) is not None:
                facts["peak_gpu_gb"] = round(gpu / 1e9, 2)
            self.run.write_manifest(self.recipe, finished=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                                    steps=steps, train_tokens_per_s=round(tokens / max(seconds, 1e-9), 1),
                                    peak_rss_gb=round(peak_rss_bytes() / 1e9, 2), **facts)
        say(f"Done: {self.run.path} ({kind}, metrics.jsonl, loss.png).")
        return self.run.path

    def report_dry_run(self, objective: Objective, validation_tokens: int, tokens: int,
                       step_seconds: list[float]) -> DryRun:
        """Measured speed and memory of the first steps, and what the whole run would take; keep nothing."""
        import shutil

        shutil.rmtree(self.run.path, ignore_errors=True)
        # The first step pays one-off costs (allocations, kernel choice); judge speed by the steps after it.
        measured = step_seconds[1:] or step_seconds
        per_step = sum(measured) / len(measured)
        tokens_per_s = tokens / sum(step_seconds)
        gpu = peak_gpu_bytes()
        gpu_line = f"  peak GPU       {gpu / 1e9:.2f} GB allocated by torch\n" if gpu is not None else ""
        projected = self.planned_steps * per_step + validation_tokens * self.spec.epochs / (3 * tokens_per_s)
        say(f"Dry run of {self.recipe.name} ({len(step_seconds)} steps, {self.precision}):\n"
            f"  speed          {tokens_per_s:,.0f} tokens/s ({per_step:.2f} s a step)\n"
            f"  peak memory    {peak_rss_bytes() / 1e9:.2f} GB resident (estimated training share "
            f"{self._training_bytes(objective) / 1e9:.2f} GB)\n"
            f"{gpu_line}"
            f"  whole run      {self.planned_steps} steps, about {_duration(projected)} including validation\n"
            f"{self._device_plan(objective)}")
        return DryRun(self.planned_steps, per_step, tokens_per_s, projected, self.precision, str(self.device))


    def _device_plan(self, objective: Objective) -> str:
        """Planned memory a GPU on several GPUs, by engine (`--nproc N --engine …`), for the same micro-batches."""
        micro_batch = self._largest_micro_batch(self.train_set, objective.packed)
        lines = []
        for devices in (2, 8):
            plans = {engine: sum(per_device_bytes(self.config, self.total, self.trainable, micro_batch, devices, engine,
                                                  loss_workspace_bytes("cuda", self.config.hidden_size),
                                                  self.spec.activation_checkpointing).values())
                     for engine in ENGINES}
            lines.append(f"  on {devices} GPUs      " + ", ".join(f"{engine} {size / 2**30:.1f}" for engine, size in
                                                               plans.items()) + " GiB each (planned, bf16)")
        return "\n".join(lines)


@dataclass(frozen=True)
class DryRun:
    """What a dry run measured, and what it projects for the whole run (validation included)."""

    steps: int
    seconds_per_step: float
    tokens_per_second: float
    projected_seconds: float
    precision: str
    device: str


# Set by request_stop (the web UI's Stop button) for the run in progress, cleared by whoever starts the next run —
# not by the session, which starts only once the model is loaded: a Stop pressed while it loads must still count.
_stop_request = threading.Event()


def request_stop() -> None:
    """Ask the training run in progress to stop as Ctrl-C does: after this step, with a checkpoint to resume from."""
    _stop_request.set()


def forget_stop_request() -> None:
    """Before starting a run in this process: an earlier run's Stop is not for it."""
    _stop_request.clear()


def drop_answerless(path: Path, lines: list[int], kept: int, spec: TrainSpec) -> None:
    """Examples whose whole answer lies past max_length teach nothing: every stage drops them with a warning that
    names their lines (or stops, with `train.overlong: error`), never silently."""
    if not lines:
        return
    fix = "raise train.max_length or shorten the prompt"
    if spec.overlong == "error" or kept == 0:
        raise DataError([Problem(path, line, None, f"no answer tokens left within max_length {spec.max_length}", fix)
                         for line in lines])
    shown = ", ".join(map(str, lines[:10])) + (" …" if len(lines) > 10 else "")
    say(f"[yellow]warning:[/] {path}: dropped {len(lines)} example(s) whose whole answer lies past max_length "
        f"{spec.max_length} (line {shown}); {fix} to keep them, or set train.overlong: error to stop instead.")


def random_states() -> dict[str, Any]:
    """Every random generator a stage may draw from: torch's CPU and CUDA generators, Python's, NumPy's."""
    states: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy

        states["numpy"] = numpy.random.get_state()
    except ImportError:
        pass
    return states


def restore_random_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    random.setstate(states["python"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
    if "numpy" in states:
        import numpy

        numpy.random.set_state(states["numpy"])


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min" if hours else f"{minutes} min {secs:02d} s"
