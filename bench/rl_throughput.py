"""RL throughput: shitate's grpo stage against TRL 1.16's GRPOTrainer, same model, prompts and rule reward; and
shitate's ppo stage on the same prompts and reward (TRL's stable API no longer ships PPO, so it has no peer here).

Both sides start from the base default model with the same LoRA settings and sample answers to the
same kids_qa questions (4 prompts × 4 answers a step, up to 32 new tokens, temperature 1), rewarded by
the kids_qa recipe's rubric (the share of its checks an answer passes: ends with 〜よ, one sentence)
through the same function, with the same KL coefficient to the start and one optimizer step per
rollout (ppo: the same 16 answers a step, each with its own advantage from the value head and GAE). TRL runs
on a CPU as its users would there: no vLLM, its defaults otherwise (the base in fp32
under bf16 autocast), once with the base loaded in bf16 and once in fp32 throughout (`bf16=False`);
shitate with its default `precision: auto` (the faster arithmetic of the two, measured).

Printed per side: rollout tokens/s (answer tokens over the time spent sampling and scoring them),
update tokens/s (answer tokens over the rest of the step), answer tokens/s over whole steps, peak RSS
(the process's own), the mean reward of each step's answers, the CPU model.

    .venv/bin/pip install -e '.[bench]'
    .venv/bin/python bench/rl_throughput.py
    .venv/bin/python bench/rl_throughput.py --steps 4 --sides shitate,shitate-ppo,trl-bf16
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
KIDS_RECIPE = REPO / "examples" / "kids_qa" / "recipe.yaml"
KIDS_TRAIN = REPO / "examples" / "kids_qa" / "data" / "train.jsonl"
SIDES = ("shitate", "shitate-ppo", "trl", "trl-bf16", "trl-fp32")  # shitate: stage grpo
SETTINGS: dict[str, Any] = {"prompts_per_step": 4, "samples_per_prompt": 4, "max_new_tokens": 32, "temperature": 1.0,
                            "learning_rate": 1.0e-4, "kl_coef": 0.05, "r": 16, "alpha": 32, "seed": 42}


def kids_recipe() -> Any:
    from shitate.config import load_recipe

    return load_recipe(KIDS_RECIPE, check_files=False)


def run_shitate(steps: int, out: Path, stage: str, start: Path | None) -> dict:
    from shitate.config import Recipe
    from shitate.evals.rubric import reward
    from shitate.train import rl

    kids = kids_recipe()
    model = str(start) if stage == "ppo" else "gemma-3-270m"  # PPO starts from a tuned model
    recipe = Recipe.model_validate({
        "name": "bench", "model": model, "template": "gemma", "stage": stage,
        "data": {"train": str(KIDS_TRAIN), "system": kids.data.system},
        "adapter": {"method": "lora", "r": SETTINGS["r"], "alpha": SETTINGS["alpha"], "dropout": 0.0},
        "train": {"epochs": 1, "max_steps": steps, "batch_size": SETTINGS["prompts_per_step"],
                  "learning_rate": SETTINGS["learning_rate"], "warmup_ratio": 0.0, "max_length": 256,
                  "seed": SETTINGS["seed"], "precision": "auto"},
        stage: {"samples_per_prompt": SETTINGS["samples_per_prompt"], "max_new_tokens": SETTINGS["max_new_tokens"],
                 "temperature": SETTINGS["temperature"], "kl_coef": SETTINGS["kl_coef"], "update_epochs": 1,
                 "rubric_weight": 1.0, "validation_every": 0},
        "eval": {"rubric": [check.model_dump() for check in kids.eval.rubric]},
    })
    started = time.perf_counter()
    run_dir = rl.run(recipe, out=out / "run", force=True, rubric_reward=reward(recipe.eval.rubric))
    wall = time.perf_counter() - started
    assert isinstance(run_dir, Path)  # not a dry run
    logged = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps_logged = [m for m in logged if "rollout_tokens_per_s" in m]
    tokens = [m["answer_tokens"] for m in steps_logged]
    rollout_seconds = sum(m["answer_tokens"] / m["rollout_tokens_per_s"] for m in steps_logged)
    update_seconds = sum(m["answer_tokens"] / m["update_tokens_per_s"] for m in steps_logged)  # one update epoch
    return {"rollout_tokens_per_s": sum(tokens) / rollout_seconds, "update_tokens_per_s": sum(tokens) / update_seconds,
            "step_tokens_per_s": sum(tokens) / (rollout_seconds + update_seconds), "tokens": tokens,
            "rewards": [round(m["reward"], 3) for m in steps_logged], "wall_s": wall,
            "steps": len(steps_logged)}


def start_run(out: Path) -> Path:
    """A two-step LoRA SFT of the default model on kids_qa, in a process of its own so the ppo side's peak RSS is its
    own: PPO starts, as InstructGPT does, from a tuned model (the stage refuses a bare base)."""
    from shitate.config import Recipe
    from shitate.train import sft

    kids = kids_recipe()
    recipe = Recipe.model_validate({
        "name": "bench-start", "model": "gemma-3-270m", "template": "gemma", "stage": "sft",
        "data": {"train": str(KIDS_TRAIN), "system": kids.data.system},
        "adapter": {"method": "lora", "r": SETTINGS["r"], "alpha": SETTINGS["alpha"], "dropout": 0.0},
        "train": {"epochs": 1, "max_steps": 2, "batch_size": 8, "learning_rate": SETTINGS["learning_rate"],
                  "seed": SETTINGS["seed"], "precision": "auto"},
    })
    run_dir = sft.run(recipe, out=out / "start", force=True)
    assert isinstance(run_dir, Path)  # not a dry run
    return run_dir


def run_trl(steps: int, out: Path, side: str) -> dict:
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM
    from trl import GRPOConfig, GRPOTrainer

    from shitate.data.formats import read_chat
    from shitate.data.templates import get_template
    from shitate.evals.rubric import reward
    from shitate.models.load import load_tokenizer, resolve

    kids = kids_recipe()
    rubric = reward(kids.eval.rubric)
    source = resolve("gemma-3-270m", progress=False)
    tokenizer = load_tokenizer(source)
    template = get_template("gemma", tokenizer)
    prompts = [template(record["messages"][:-1], add_generation_prompt=True) for _, record in read_chat(KIDS_TRAIN)]
    answer_tokens: list[int] = []
    rewards: list[float] = []

    def rubric_reward(prompts: list[str], completions: list[str], completion_ids: list[list[int]], **_: Any) -> list[float]:
        answer_tokens.append(sum(len(ids) for ids in completion_ids))
        scores = rubric([text.split(template.end_of_turn)[0] for text in completions])
        rewards.append(sum(scores) / len(scores))
        return scores

    dtype, autocast = trl_precision(side)
    model = AutoModelForCausalLM.from_pretrained(source.folder, dtype=dtype, local_files_only=True)
    StepTimer = step_timer()
    args = GRPOConfig(output_dir=str(out / "trl"), max_steps=steps, learning_rate=SETTINGS["learning_rate"],
                      per_device_train_batch_size=SETTINGS["prompts_per_step"] * SETTINGS["samples_per_prompt"],
                      num_generations=SETTINGS["samples_per_prompt"], max_completion_length=SETTINGS["max_new_tokens"],
                      temperature=SETTINGS["temperature"], beta=SETTINGS["kl_coef"], num_iterations=1,
                      lr_scheduler_type="linear", warmup_steps=0, bf16=autocast, use_cpu=True, seed=SETTINGS["seed"],
                      logging_steps=1, save_strategy="no", report_to=[], disable_tqdm=True)
    lora = LoraConfig(r=SETTINGS["r"], lora_alpha=SETTINGS["alpha"], lora_dropout=0.0, target_modules="all-linear",
                      task_type="CAUSAL_LM")
    trainer = GRPOTrainer(model=model, reward_funcs=[rubric_reward], args=args,
                          train_dataset=Dataset.from_list([{"prompt": p} for p in prompts]), processing_class=tokenizer,
                          peft_config=lora, callbacks=[StepTimer()])
    sampling = [0.0]
    generate = trainer._generate_and_score_completions  # TRL's rollout: sampling, the reference pass, the reward

    def timed(*args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        result = generate(*args, **kwargs)
        sampling[0] += time.perf_counter() - started
        return result

    trainer._generate_and_score_completions = timed
    started = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - started
    tokens = sum(answer_tokens)
    return {"rollout_tokens_per_s": tokens / sampling[0], "update_tokens_per_s": tokens / (StepTimer.seconds - sampling[0]),
            "step_tokens_per_s": tokens / StepTimer.seconds, "rewards": [round(r, 3) for r in rewards], "wall_s": wall,
            "tokens": answer_tokens, "steps": trainer.state.global_step}


def child(side: str, steps: int, result: Path, start: Path | None) -> None:
    if side == "start":
        result.write_text(json.dumps({"run": str(start_run(result.parent))}))
        return
    with tempfile.TemporaryDirectory() as folder:
        if side.startswith("shitate"):
            figures = run_shitate(steps, Path(folder), "ppo" if side.endswith("-ppo") else "grpo", start)
        else:
            figures = run_trl(steps, Path(folder), side)
    figures["peak_rss_gib"] = peak_rss_bytes() / 1024**3
    result.write_text(json.dumps(figures))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sides", default=",".join(SIDES))
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--side", help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--start", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        child(args.side, args.steps, args.result, args.start)
        return
    print(f"CPU: {cpu_model()}; 2048×2048 matmul: bf16 {matmul_peak_gflops():.0f}, fp32 "
          f"{matmul_peak_gflops(dtype='float32'):.0f} GFLOP/s; settings: {SETTINGS}, "
          f"{args.steps} steps", flush=True)
    results = {}
    with tempfile.TemporaryDirectory() as folder:
        start: list[str] = []
        if "shitate-ppo" in args.sides.split(","):
            made = run_side(__file__, "start", ["--side", "start"], Path(folder) / "start.json")
            start = ["--start", made["run"]] if made else []
        for side in args.sides.split(","):
            result = Path(folder) / f"{side}.json"
            figures = run_side(__file__, side, ["--side", side, "--steps", str(args.steps), *start], result)
            if figures is None:
                continue
            results[side] = figures
            print(f"  {side}: {results[side]}", flush=True)
    print(f"\n{'side':<11} {'rollout tok/s':>13} {'update tok/s':>12} {'step tok/s':>10} {'peak RSS':>9} {'steps':>6} "
          f"{'wall s':>7}  rewards")
    for side, r in results.items():
        print(f"{side:<11} {r['rollout_tokens_per_s']:>13.1f} {r['update_tokens_per_s']:>12.1f} {r['step_tokens_per_s']:>10.1f} "
              f"{r['peak_rss_gib']:>6.2f}GiB {r['steps']:>6} {r['wall_s']:>7.1f}  {r['rewards']}")


if __name__ == "__main__":
    main()
