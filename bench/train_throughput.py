"""Training throughput: shitate against TRL's SFTTrainer, same model, data and LoRA settings.

Each side runs in its own process (so peak RSS is its own) on the same examples. For SFT
(kids_qa, dolly-ja) the chats are rendered with the same Gemma template: shitate's sft stage
against TRL 1.x `SFTTrainer` with completion-only loss. For continued pretraining (`text`:
RealPersonaChat dialogues) shitate's pretrain stage against `SFTTrainer` on a language-modelling
dataset (`{"text": …}`, loss on every token). TRL runs as its users run it, each way three times:
with its defaults (the base in fp32 under bf16 autocast), with the frozen base loaded in bf16, as
TRL's LoRA examples do, and in fp32 throughout (`bf16=False`), which is faster on a CPU whose fp32
matmul outruns its bf16 one; padding to the longest example, and `packing=True` (BFD). shitate runs
with its default `precision: auto` (the faster arithmetic of the two, measured), and in bf16.

Both sides are timed on the same basis: the wall time of the training steps alone (TRL: from
each step's begin to its end, by a callback; shitate: its own step timer), over the real
(non-padding) tokens of the data set. Printed too, the wall time of a whole run from loading the model to the
end of training, libraries already imported on both sides: shitate's includes a validation pass each epoch,
its checkpoints and the saved adapter; TRL's, as configured here, neither validates nor saves.
Also printed: peak RSS, final validation loss, model-FLOPs utilisation against the faster of a bf16 and
an fp32 matmul measured in the same run, the CPU model, and the ratios against the fastest and the leanest
TRL side.

    .venv/bin/pip install -e '.[bench]'
    .venv/bin/python bench/train_throughput.py                 # kids_qa, dolly-ja and text, all sides
    .venv/bin/python bench/train_throughput.py --data kids --sides shitate,trl-pad-bf16
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from shitate.memory import cpu_model, peak_rss_bytes  # noqa: F401 - align_throughput and serve_load import them from here

REPO = Path(__file__).resolve().parents[1]
DOLLY = REPO.parent / "shared" / "data" / "dolly-ja" / "databricks-dolly-15k-ja.jsonl"
PERSONA_CHAT = REPO.parent / "shared" / "data" / "real-persona-chat" / "dialogues-2000.jsonl"
# shitate: the defaults (on a CPU, each step of 8 examples in micro-batches of at most 256 tokens; precision auto);
# shitate-bf16: bf16 arithmetic; shitate-whole: each step in one pass (faster, more memory); shitate-ckpt: activation
# checkpointing. trl-*: TRL's defaults (fp32 base, bf16 autocast); trl-*-bf16: the frozen base loaded in bf16;
# trl-*-fp32: fp32 throughout.
SIDES = ("shitate", "shitate-bf16", "shitate-whole", "shitate-ckpt", "trl-pad", "trl-pack", "trl-pad-bf16",
         "trl-pack-bf16", "trl-pad-fp32", "trl-pack-fp32")
# Not among the defaults, `shitate-percall`: on a GPU, what a CPU runs (an attention call per example, 128-row loss
# chunks) — the GPU's own choices measured against it. On a CPU it is the same as `shitate`.
TRL_SIDES = tuple(side for side in SIDES if side.startswith("trl"))
# The model every side trains: the default, or `--model` (any folder or GGUF shitate loads).
MODEL = "gemma-3-270m"
SETTINGS: dict[str, Any] = {"epochs": 1, "batch_size": 8, "learning_rate": 2.0e-4, "max_length": 256, "r": 16, "alpha": 32,
                            "dropout": 0.05, "seed": 42}


def prepare_data(name: str, folder: Path, train_count: int, validation_count: int) -> tuple[Path, Path]:
    """Write train/validation chat JSONL for a data set: the kids_qa demo or a fixed slice of dolly-ja."""
    from shitate.data.formats import import_records, read_chat, write_jsonl
    from shitate.data.templates import encode_chat, get_template
    from shitate.models.load import load_tokenizer, resolve

    if name == "kids":
        train = [r for _, r in read_chat(REPO / "examples/kids_qa/data/train.jsonl")][:train_count]
        validation = [r for _, r in read_chat(REPO / "examples/kids_qa/data/validation.jsonl")][:validation_count]
    elif name == "text":
        # Dialogues of RealPersonaChat as plain text, six utterances a document (about 100-200 tokens).
        documents = []
        for line in PERSONA_CHAT.open(encoding="utf-8"):
            utterances = [u["text"] for u in json.loads(line)["utterances"]]
            documents += [{"text": "\n".join(utterances[i:i + 6])} for i in range(0, len(utterances) - 5, 6)]
            if len(documents) >= train_count + validation_count:
                break
        train, validation = documents[:train_count], documents[train_count:train_count + validation_count]
    else:
        # The first dolly-ja records (no context passage) that fit max_length: short Japanese chats of varied length.
        tokenizer = load_tokenizer(resolve(MODEL, progress=False))
        template = get_template("gemma", tokenizer)
        records, _ = import_records(DOLLY, fmt="dolly", skip_bad=True)
        fitting = [r for r in records if "context" not in r
                   and len(encode_chat(r["messages"], tokenizer, template, 10**6)["input_ids"]) <= SETTINGS["max_length"]]
        train, validation = fitting[:train_count], fitting[train_count:train_count + validation_count]
    paths = folder / f"{name}-train.jsonl", folder / f"{name}-validation.jsonl"
    write_jsonl(paths[0], train)
    write_jsonl(paths[1], validation)
    return paths


def run_shitate(train: Path, validation: Path, out: Path, text: bool, checkpointing: bool = False,
                micro_batch_tokens: int | str | None = "auto", precision: str = "auto") -> dict:
    from shitate.config import Recipe
    from shitate.train import pretrain, sft

    stage = {"stage": "pretrain", "pretrain": {"block_size": SETTINGS["max_length"]}} if text else {"stage": "sft"}
    recipe = Recipe.model_validate({
        "name": "bench", "model": MODEL, "template": "gemma", **stage,
        "data": {"train": str(train), "validation": str(validation)},
        "adapter": {"method": "lora", "r": SETTINGS["r"], "alpha": SETTINGS["alpha"], "dropout": SETTINGS["dropout"]},
        "train": {"epochs": SETTINGS["epochs"], "batch_size": SETTINGS["batch_size"], "learning_rate": SETTINGS["learning_rate"],
                  "max_length": SETTINGS["max_length"], "seed": SETTINGS["seed"], "warmup_ratio": 0.0,
                  "lr_scheduler": "linear", "precision": precision, "activation_checkpointing": checkpointing,
                  "micro_batch_tokens": micro_batch_tokens},
    })
    stage_module = pretrain if text else sft
    import peft  # noqa: F401 - imported before the clock starts, as TRL's side imports its libraries first
    import transformers  # noqa: F401

    started = time.perf_counter()
    run_dir = stage_module.run(recipe, out=out / "run", force=True)
    wall = time.perf_counter() - started
    manifest = json.loads((run_dir / "manifest.json").read_text())
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {"tokens_per_s": manifest["train_tokens_per_s"], "val_loss": [m["val_loss"] for m in metrics if "val_loss" in m][-1],
            "wall_s": wall, "precision": manifest["precision"]}


def run_trl(train: Path, validation: Path, out: Path, text: bool, packing: bool, side: str) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer

    from shitate.data.formats import read_chat
    from shitate.data.templates import get_template
    from shitate.models.load import load_tokenizer, resolve

    started = time.perf_counter()
    source = resolve(MODEL, progress=False)
    tokenizer = load_tokenizer(source)
    template = get_template("gemma", tokenizer)

    def as_dataset(path: Path) -> Dataset:
        if text:  # a language-modelling dataset: loss on every token
            return Dataset.from_list([json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()])
        # The same rendered text shitate trains on, split where the answer starts.
        rows = [{"prompt": template(r["messages"][:-1], add_generation_prompt=True),
                 "completion": r["messages"][-1]["content"] + template.end_of_turn} for _, r in read_chat(path)]
        return Dataset.from_list(rows)

    StepTimer = step_timer()
    dtype, autocast = trl_precision(side)
    model = AutoModelForCausalLM.from_pretrained(source.folder, dtype=dtype, local_files_only=True)
    config = SFTConfig(
        output_dir=str(out / "trl"), num_train_epochs=SETTINGS["epochs"], per_device_train_batch_size=SETTINGS["batch_size"],
        per_device_eval_batch_size=SETTINGS["batch_size"], learning_rate=SETTINGS["learning_rate"],
        lr_scheduler_type="linear", warmup_steps=0, max_length=SETTINGS["max_length"], bf16=autocast,
        use_cpu=not torch.cuda.is_available(),
        seed=SETTINGS["seed"], logging_steps=1, save_strategy="no", eval_strategy="no", report_to=[],
        packing=packing, dataloader_num_workers=0, disable_tqdm=True,
        **({"dataset_text_field": "text"} if text else {"completion_only_loss": True, "eos_token": template.end_of_turn}),
    )
    lora = LoraConfig(r=SETTINGS["r"], lora_alpha=SETTINGS["alpha"], lora_dropout=SETTINGS["dropout"],
                      target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = SFTTrainer(model=model, args=config, train_dataset=as_dataset(train), eval_dataset=as_dataset(validation),
                         processing_class=tokenizer, peft_config=lora, callbacks=[StepTimer()])
    real_tokens = sum(len(ids) for ids in trainer.train_dataset["input_ids"]) * SETTINGS["epochs"]
    trainer.train()
    wall = time.perf_counter() - started
    return {"tokens_per_s": real_tokens / StepTimer.seconds, "val_loss": trainer.evaluate()["eval_loss"], "wall_s": wall}


def trl_precision(side: str) -> tuple[Any, bool]:
    """(the dtype TRL's base loads in, whether TRL trains under bf16 autocast) for a TRL side: its defaults, `-bf16`
    (a bf16 base, as its LoRA examples load one) or `-fp32` (fp32 throughout)."""
    import torch

    if side.endswith("-bf16"):
        return torch.bfloat16, True
    return torch.float32, not side.endswith("-fp32")


def run_side(script: str, label: str, options: list[str], result: Path) -> dict | None:
    """One bench side in a process of its own (so its peak memory is its own): its figures, or None with the
    end of its error printed."""
    done = subprocess.run([sys.executable, script, *options, "--result", str(result)], stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)
    if done.returncode:
        print(f"  {label}: failed: {done.stderr.strip().splitlines()[-3:]}", flush=True)
        return None
    return json.loads(result.read_text())


def step_timer() -> Any:
    """A TRL callback class that adds up the wall time from each optimizer step's begin to its end: the same basis
    as shitate's step timer. Read `.seconds` after training."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        seconds = 0.0

        def on_step_begin(self, args, state, control, **kwargs):
            self.started = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            StepTimer.seconds += time.perf_counter() - self.started

    return StepTimer


def matmul_peak_gflops(size: int = 2048, repeats: int = 20, dtype: str = "bfloat16") -> float:
    """Matmul throughput (bf16, or `dtype`) on the device training runs on: the ceiling MFU is measured against."""
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        size, repeats = 8192, 50
    a, b = (torch.randn(size, size, dtype=getattr(torch, dtype), device=device) for _ in range(2))
    for _ in range(3):
        a @ b
    if device == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(repeats):
        a @ b
    if device == "cuda":
        torch.cuda.synchronize()
    return 2 * size**3 * repeats / (time.perf_counter() - started) / 1e9


def flops_per_token(train: Path, text: bool) -> float:
    """LoRA training FLOPs per token: 4 × body parameters for every token, 4 × output layer for labelled tokens."""
    from shitate.data.formats import read_chat
    from shitate.data.templates import IGNORE_INDEX, encode_chat, get_template
    from shitate.models.load import load_tokenizer, resolve

    source = resolve(MODEL, progress=False)
    config = json.loads((Path(source.folder) / "config.json").read_text())
    head = config["vocab_size"] * config["hidden_size"]
    layer = (config["hidden_size"] * config["head_dim"] * (config["num_attention_heads"] * 2 + config["num_key_value_heads"] * 2)
             + 3 * config["hidden_size"] * config["intermediate_size"])
    body = layer * config["num_hidden_layers"]
    if text:  # every token is labelled
        return 4 * body + 4 * head
    tokenizer = load_tokenizer(source)
    template = get_template("gemma", tokenizer)
    examples = [encode_chat(r["messages"], tokenizer, template, SETTINGS["max_length"]) for _, r in read_chat(train)]
    tokens = sum(len(e["input_ids"]) for e in examples)
    labelled = sum(sum(1 for label in e["labels"] if label != IGNORE_INDEX) for e in examples)
    return 4 * body + 4 * head * labelled / tokens


def use_cpu_choices() -> None:
    """Side `shitate-percall`: on any device, what a CPU runs (an attention call per example, the CPU's loss chunks)."""
    from shitate.models import attention, logprobs

    attention.use_one_masked_call = lambda *args: False
    logprobs.loss_chunk_rows = lambda device: logprobs.LOSS_CHUNK


def child(side: str, train: Path, validation: Path, result: Path, text: bool) -> None:
    if side == "shitate-percall":
        use_cpu_choices()
    with tempfile.TemporaryDirectory() as folder:
        if side.startswith("shitate"):
            figures = run_shitate(train, validation, Path(folder), text, checkpointing=side == "shitate-ckpt",
                                  micro_batch_tokens=None if side == "shitate-whole" else "auto",
                                  precision="bf16" if side == "shitate-bf16" else "auto")
        else:
            figures = run_trl(train, validation, Path(folder), text, packing="pack" in side, side=side)
    figures["peak_rss_gib"] = peak_rss_bytes() / 1024**3  # not ru_maxrss: it inherits the parent's peak
    import torch

    if torch.cuda.is_available():  # on a GPU the memory that limits a run is the GPU's
        figures["peak_gpu_gib"] = torch.cuda.max_memory_allocated() / 1024**3
    result.write_text(json.dumps(figures))


def main() -> None:
    global MODEL
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="kids,dolly,text", help="comma-separated: kids, dolly (sft), text (pretrain)")
    parser.add_argument("--sides", default=",".join(SIDES))
    parser.add_argument("--train-examples", type=int, default=80, help="examples trained on (one epoch)")
    parser.add_argument("--validation-examples", type=int, default=30)
    parser.add_argument("--epochs", type=int, default=1, help="more epochs: more steps (a GPU needs more than 10)")
    parser.add_argument("--model", default=MODEL, help="the model every side trains (default: the embedded Gemma 3 270M)")
    parser.add_argument("--side", help=argparse.SUPPRESS)
    parser.add_argument("--train", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--validation", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--text", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    MODEL = args.model
    SETTINGS["epochs"] = args.epochs
    if args.side:
        child(args.side, args.train, args.validation, args.result, args.text)
        return

    peaks = {dtype: matmul_peak_gflops(dtype=dtype) for dtype in ("bfloat16", "float32")}
    peak = max(peaks.values())  # MFU against the faster arithmetic: on some CPUs that is fp32
    print(f"{device_name()}; matmul: bf16 {peaks['bfloat16']:.0f}, fp32 {peaks['float32']:.0f} GFLOP/s; model {MODEL}; "
          f"settings: {SETTINGS}, "
          f"{args.train_examples} examples", flush=True)
    with tempfile.TemporaryDirectory() as folder:
        for data in args.data.split(","):
            train, validation = prepare_data(data, Path(folder), args.train_examples, args.validation_examples)
            text = data == "text"
            per_token = flops_per_token(train, text)
            results = {}
            if cuda_available():  # the first process on a GPU pays one-off kernel loading; no side should carry it
                run_side(__file__, "warm-up", ["--side", "shitate", "--train", str(train), "--validation", str(validation),
                                                "--model", MODEL, *(["--text"] if text else [])], Path(folder) / "warm-up.json")
            for side in args.sides.split(","):
                if text and side in ("shitate-whole",):
                    continue  # pretraining rows are one block each: whole steps and micro-batches are the same passes
                result = Path(folder) / f"{data}-{side}.json"
                figures = run_side(__file__, f"{data} {side}", ["--side", side, "--train", str(train), "--validation",
                                   str(validation), "--model", MODEL, "--epochs", str(args.epochs),
                                   *(["--text"] if text else [])], result)
                if figures is None:
                    continue
                results[side] = figures
                print(f"  {data} {side}: {results[side]['tokens_per_s']:.1f} tokens/s", flush=True)
            _print_table(data, results, per_token, peak)


def _print_table(data: str, results: dict, per_token: float, peak: float) -> None:
    print(f"\n{data}: {per_token / 1e6:.0f} MFLOP per token (4 × body, plus 4 × output layer where labelled)")
    # On a GPU the memory compared is the GPU's peak (what limits a run there); on a CPU the process's peak RSS.
    memory = "peak_gpu_gib" if any("peak_gpu_gib" in r for r in results.values()) else "peak_rss_gib"
    memory_label = "peak GPU" if memory == "peak_gpu_gib" else "peak RSS"
    print(f"{'side':<14} {'tokens/s':>9} {memory_label:>9} {'val loss':>9} {'MFU':>6} {'run s':>9}")
    for side, r in results.items():
        mfu = r["tokens_per_s"] * per_token / (peak * 1e9)
        print(f"{side:<14} {r['tokens_per_s']:>9.1f} {r[memory]:>6.2f}GiB {r['val_loss']:>9.4f} {mfu:>6.1%} "
              f"{r['wall_s']:>9.1f}")
    trl = {s: results[s] for s in TRL_SIDES if s in results}
    if not trl:
        return
    fastest_side = max(trl, key=lambda s: trl[s]["tokens_per_s"])
    leanest_side = min(trl, key=lambda s: trl[s][memory])
    fastest, leanest = trl[fastest_side], trl[leanest_side]
    for side in ("shitate", "shitate-bf16", "shitate-whole", "shitate-ckpt"):
        if side in results:
            ours = results[side]
            # Validation loss is compared with TRL padding to the longest: the same examples in the same steps, in the
            # same arithmetic where that side ran.
            same_steps = trl.get(f"trl-pad-{ours.get('precision', 'bf16')}", trl.get("trl-pad", fastest))
            print(f"{side}: tokens/s {ours['tokens_per_s'] / fastest['tokens_per_s']:.2f}× the fastest TRL side "
                  f"({fastest_side}), {memory_label} {ours[memory] / leanest[memory]:.2f}× the leanest "
                  f"({leanest_side}), val loss {ours['val_loss'] - same_steps['val_loss']:+.4f} against TRL (pad)")


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def device_name() -> str:
    """What the figures were measured on: the GPU when training runs on one, and always the CPU."""
    import torch

    gpu = f"GPU: {torch.cuda.get_device_name()}; " if torch.cuda.is_available() else ""
    return f"{gpu}CPU: {cpu_model()}"


if __name__ == "__main__":
    main()
