"""Preference training throughput: shitate's dpo, orpo and reward stages against TRL 1.16's DPOTrainer,
ORPOTrainer (trl.experimental) and RewardTrainer, same model, pairs and LoRA settings.

Pairs: GPT-4's agreeing pairwise judgments of Japanese Vicuna answers (../shared/data/ja-vicuna-qa),
those whose prompt and longer answer fit in max_length tokens, so neither side cuts anything. The
same Gemma template renders the prompt for both sides; TRL gets it as text with the answers as
completions (ending with the end-of-turn marker), as its users give a pre-rendered prompt.

Each side runs in its own process (peak RSS is its own). TRL runs as its users run it: its defaults
(the base in fp32 under bf16 autocast), with the frozen base loaded in bf16, and in fp32 throughout
(`bf16=False`, faster on a CPU whose fp32 matmul outruns its bf16 one); shitate with its default
`precision: auto` (the faster of the two, measured) and in bf16. Both sides are timed
on the same basis — the wall time of the training steps, plus for shitate's dpo the one pass that
computes the reference log-probabilities before training (TRL computes them inside its steps) — over
the same numerator: the tokens of the pairs (prompt + chosen + rejected). Also printed: peak RSS,
the validation loss before training and after one epoch (the same pairs, on shitate's definition of
the loss; TRL's own where it differs), the CPU model.

    .venv/bin/pip install -e '.[bench]'
    .venv/bin/python bench/align_throughput.py                       # dpo, orpo, reward; all sides
    .venv/bin/python bench/align_throughput.py --stages dpo --pairs 48
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_throughput import cpu_model, matmul_peak_gflops, peak_rss_bytes, run_side, step_timer, trl_precision  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
JUDGMENTS = REPO.parent / "shared" / "data" / "ja-vicuna-qa" / "model_judgment" / "pairwise" / "gpt-4"
SIDES = ("shitate", "shitate-bf16", "trl", "trl-bf16", "trl-fp32")
SETTINGS: dict[str, Any] = {"batch_size": 8, "learning_rate": 1.0e-4, "max_length": 256, "r": 16, "alpha": 32,
                            "dropout": 0.0, "seed": 42, "beta": 0.1}


def prepare_pairs(folder: Path, train_count: int, validation_count: int) -> tuple[Path, Path, int]:
    """Train/validation pair files (split by question) of pairs that fit max_length; returns their token count."""
    from shitate.data.formats import write_jsonl
    from shitate.data.preference import encode_pair, import_preferences
    from shitate.data.split import split_records
    from shitate.data.templates import get_template
    from shitate.models.load import load_tokenizer, resolve

    tokenizer = load_tokenizer(resolve("gemma-3-270m", progress=False))
    template = get_template("gemma", tokenizer)
    pairs, _, _ = import_preferences(JUDGMENTS)
    fitting, lengths = [], {}
    for pair in pairs:
        whole = encode_pair(pair, tokenizer, template, 10**6, None)
        if whole is None:
            continue
        prompt, chosen, rejected = whole["branches"]
        if prompt + max(chosen, rejected) <= SETTINGS["max_length"]:
            fitting.append(pair)
            lengths[id(pair)] = len(whole["input_ids"])
    parts = split_records(fitting, [0.85, 0.15, 0.0], seed=SETTINGS["seed"])
    train, validation = parts["train"][:train_count], parts["validation"][:validation_count]
    paths = folder / "train.jsonl", folder / "validation.jsonl"
    write_jsonl(paths[0], train)
    write_jsonl(paths[1], validation)
    return paths[0], paths[1], sum(lengths[id(p)] for p in train)


def run_shitate(stage: str, train: Path, validation: Path, out: Path, pair_tokens: int, precision: str = "auto") -> dict:
    from shitate.config import Recipe
    from shitate.train import preference

    reference_seconds = [0.0]
    original = preference.reference_logps

    def timed(*args, **kwargs):
        started = time.perf_counter()
        values = original(*args, **kwargs)
        reference_seconds[0] += time.perf_counter() - started
        return values

    preference.reference_logps = timed
    recipe = Recipe.model_validate({
        "name": "bench", "model": "gemma-3-270m", "template": "gemma", "stage": stage,
        "data": {"train": str(train), "validation": str(validation)},
        "adapter": {"method": "lora", "r": SETTINGS["r"], "alpha": SETTINGS["alpha"], "dropout": SETTINGS["dropout"]},
        "train": {"epochs": 1, "batch_size": SETTINGS["batch_size"], "learning_rate": SETTINGS["learning_rate"],
                  "max_length": SETTINGS["max_length"], "seed": SETTINGS["seed"], "warmup_ratio": 0.0,
                  "lr_scheduler": "linear", "precision": precision},
        **({"dpo": {"beta": SETTINGS["beta"]}} if stage == "dpo" else {}),
        **({"orpo": {"odds_ratio_weight": SETTINGS["beta"]}} if stage == "orpo" else {}),
    })
    started = time.perf_counter()
    run_dir = preference.run(recipe, out=out / "run", force=True)
    assert isinstance(run_dir, Path)  # not a dry run
    wall = time.perf_counter() - started
    manifest = json.loads((run_dir / "manifest.json").read_text())
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    # The manifest's speed is the pairs' tokens (each trained once, uncut) over the seconds of the steps.
    step_seconds = pair_tokens / manifest["train_tokens_per_s"]
    # Only the training pairs' share of the reference pass: TRL computes no reference for validation in its steps.
    train_share = len(train.read_text().splitlines()) / (len(train.read_text().splitlines())
                                                         + len(validation.read_text().splitlines()))
    seconds = step_seconds + reference_seconds[0] * train_share
    val_losses = [m["val_loss"] for m in metrics if "val_loss" in m]  # before the first step and after the epoch
    return {"tokens_per_s": pair_tokens / seconds, "val_loss_before": val_losses[0], "val_loss": val_losses[-1],
            "wall_s": wall, "reference_s": reference_seconds[0] * train_share, "steps": manifest["steps"]}


def run_trl(stage: str, train: Path, validation: Path, out: Path, side: str, pair_tokens: int) -> dict:
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from shitate.data.preference import answer_messages, answer_text, conversation_prompt
    from shitate.data.templates import get_template
    from shitate.models.load import load_tokenizer, resolve

    source = resolve("gemma-3-270m", progress=False)
    tokenizer = load_tokenizer(source)
    template = get_template("gemma", tokenizer)

    def as_dataset(path: Path) -> Dataset:
        rows = []
        for line in path.read_text(encoding="utf-8").splitlines():
            pair = json.loads(line)
            rows.append({"prompt": template(conversation_prompt(pair, None), add_generation_prompt=True),
                         **{side: answer_text(answer_messages(pair[side], side)) + template.end_of_turn
                            for side in ("chosen", "rejected")}})
        return Dataset.from_list(rows)

    StepTimer = step_timer()
    dtype, autocast = trl_precision(side)
    common = dict(output_dir=str(out / "trl"), num_train_epochs=1, per_device_train_batch_size=SETTINGS["batch_size"],
                  per_device_eval_batch_size=SETTINGS["batch_size"], learning_rate=SETTINGS["learning_rate"],
                  lr_scheduler_type="linear", warmup_steps=0, max_length=SETTINGS["max_length"], bf16=autocast,
                  use_cpu=True, seed=SETTINGS["seed"], logging_steps=1, save_strategy="no", eval_strategy="no",
                  report_to=[], dataloader_num_workers=0, disable_tqdm=True)
    lora = LoraConfig(r=SETTINGS["r"], lora_alpha=SETTINGS["alpha"], lora_dropout=SETTINGS["dropout"],
                      target_modules="all-linear", task_type="SEQ_CLS" if stage == "reward" else "CAUSAL_LM")
    if stage == "dpo":
        from trl import DPOConfig, DPOTrainer

        model = AutoModelForCausalLM.from_pretrained(source.folder, dtype=dtype, local_files_only=True)
        trainer = DPOTrainer(model=model, args=DPOConfig(**common, beta=SETTINGS["beta"]), train_dataset=as_dataset(train),
                             eval_dataset=as_dataset(validation), processing_class=tokenizer, peft_config=lora,
                             callbacks=[StepTimer()])
    elif stage == "orpo":
        from trl.experimental.orpo import ORPOConfig, ORPOTrainer

        model = AutoModelForCausalLM.from_pretrained(source.folder, dtype=dtype, local_files_only=True)
        trainer = ORPOTrainer(model=model, args=ORPOConfig(**common, beta=SETTINGS["beta"]),
                              train_dataset=as_dataset(train), eval_dataset=as_dataset(validation),
                              processing_class=tokenizer, peft_config=lora, callbacks=[StepTimer()])
    else:
        from trl import RewardConfig, RewardTrainer

        model = AutoModelForSequenceClassification.from_pretrained(source.folder, dtype=dtype, num_labels=1,
                                                                   local_files_only=True)
        model.config.pad_token_id = tokenizer.pad_token_id
        trainer = RewardTrainer(model=model, args=RewardConfig(**common), train_dataset=as_dataset(train),
                                eval_dataset=as_dataset(validation), processing_class=tokenizer, peft_config=lora,
                                callbacks=[StepTimer()])
    before = trainer.evaluate()  # on the untouched model: checks that both sides compute the same loss
    started = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - started
    after = trainer.evaluate()
    return {"tokens_per_s": pair_tokens / StepTimer.seconds, "val_loss_before": _our_loss(stage, before),
            "val_loss": _our_loss(stage, after), "trl_val_loss": after["eval_loss"], "wall_s": wall,
            "steps": trainer.state.global_step}


def _our_loss(stage: str, metrics: dict) -> float:
    """TRL's validation loss on shitate's definition. They differ for ORPO only: TRL 1.16 takes the NLL over the
    prompt and the chosen answer ("computed over the full prompt and response"), shitate and the ORPO paper over
    the answer. TRL logs the answer's mean log-probability (rewards/chosen = β·mean log p) and the mean
    log σ(log odds), which give the answer-only loss: −mean log p − β·log σ."""
    if stage != "orpo":
        return metrics["eval_loss"]
    return -metrics["eval_rewards/chosen"] / SETTINGS["beta"] - SETTINGS["beta"] * metrics["eval_log_odds_ratio"]


def child(stage: str, side: str, train: Path, validation: Path, result: Path, pair_tokens: int) -> None:
    with tempfile.TemporaryDirectory() as folder:
        if side.startswith("shitate"):
            figures = run_shitate(stage, train, validation, Path(folder), pair_tokens,
                                  precision="bf16" if side == "shitate-bf16" else "auto")
        else:
            figures = run_trl(stage, train, validation, Path(folder), side, pair_tokens)
    figures["peak_rss_gib"] = peak_rss_bytes() / 1024**3  # not ru_maxrss: it inherits the parent's peak
    result.write_text(json.dumps(figures))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stages", default="dpo,orpo,reward")
    parser.add_argument("--sides", default=",".join(SIDES))
    parser.add_argument("--pairs", type=int, default=64, help="training pairs (one epoch)")
    parser.add_argument("--validation-pairs", type=int, default=16)
    parser.add_argument("--stage", help=argparse.SUPPRESS)
    parser.add_argument("--side", help=argparse.SUPPRESS)
    parser.add_argument("--train", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--validation", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--pair-tokens", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        child(args.stage, args.side, args.train, args.validation, args.result, args.pair_tokens)
        return
    if not JUDGMENTS.is_dir():
        raise SystemExit(f"{JUDGMENTS}: not found; this bench reads ja-vicuna-qa from ../shared/data.")
    print(f"CPU: {cpu_model()}; 2048×2048 matmul: bf16 {matmul_peak_gflops():.0f}, fp32 "
          f"{matmul_peak_gflops(dtype='float32'):.0f} GFLOP/s; settings: {SETTINGS}",
          flush=True)
    with tempfile.TemporaryDirectory() as folder:
        train, validation, pair_tokens = prepare_pairs(Path(folder), args.pairs, args.validation_pairs)
        print(f"{len(train.read_text().splitlines())} training pairs ({pair_tokens} tokens: prompt + chosen + "
              f"rejected), {len(validation.read_text().splitlines())} validation pairs, 1 epoch", flush=True)
        for stage in args.stages.split(","):
            results = {}
            for side in args.sides.split(","):
                result = Path(folder) / f"{stage}-{side}.json"
                figures = run_side(__file__, f"{stage} {side}", ["--stage", stage, "--side", side, "--train", str(train),
                                   "--validation", str(validation), "--pair-tokens", str(pair_tokens)], result)
                if figures is None:
                    continue
                results[side] = figures
                print(f"  {stage} {side}: {results[side]['tokens_per_s']:.1f} tokens/s", flush=True)
            _print_table(stage, results)


def _print_table(stage: str, results: dict) -> None:
    print(f"\n{stage}")
    print(f"{'side':<12} {'tokens/s':>9} {'peak RSS':>9} {'val loss before':>15} {'after':>7} {'TRL own loss':>12} "
          f"{'steps':>6} {'train() s':>9}")
    for side, r in results.items():
        own = f"{r['trl_val_loss']:.4f}" if "trl_val_loss" in r else "-"
        print(f"{side:<12} {r['tokens_per_s']:>9.1f} {r['peak_rss_gib']:>6.2f}GiB {r['val_loss_before']:>15.4f} "
              f"{r['val_loss']:>7.4f} {own:>12} {r['steps']:>6} {r['wall_s']:>9.1f}")
    trl = {s: r for s, r in results.items() if s.startswith("trl")}
    if not trl:
        return
    fastest = max(trl, key=lambda s: trl[s]["tokens_per_s"])
    leanest = min(trl, key=lambda s: trl[s]["peak_rss_gib"])
    for side in ("shitate", "shitate-bf16"):
        if side not in results:
            continue
        ours = results[side]
        print(f"{side}: tokens/s {ours['tokens_per_s'] / trl[fastest]['tokens_per_s']:.2f}× the fastest TRL side "
              f"({fastest}), peak RSS {ours['peak_rss_gib'] / trl[leanest]['peak_rss_gib']:.2f}× the leanest ({leanest}), "
              f"validation loss (shitate's definition) {ours['val_loss_before'] - trl[fastest]['val_loss_before']:+.4f} "
              f"before training and {ours['val_loss'] - trl[fastest]['val_loss']:+.4f} after, against {fastest}")


if __name__ == "__main__":
    main()
