"""`shitate train` end to end on a tiny Gemma 3: the loss falls, the run folder is complete, resume is exact."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from conftest import assert_same_adapter, crashed_copy, kids_records, write_jsonl
from shitate.cli import app
from shitate.errors import ConfigError, DataError

runner = CliRunner()


def make_recipe(folder: Path, model: Path, extra: str = "") -> Path:
    records = kids_records(40)
    write_jsonl(folder / "train.jsonl", records[:24])
    write_jsonl(folder / "validation.jsonl", records[24:32])
    write_jsonl(folder / "test.jsonl", records[32:40])
    recipe = folder / "recipe.yaml"
    recipe.write_text(f"""
name: tiny
model: {model}
template: gemma
data: {{train: train.jsonl, validation: validation.jsonl, test: test.jsonl, system: 子ども向けに答えてね。}}
adapter: {{method: lora, r: 8, alpha: 16, dropout: 0.1}}
train: {{epochs: 4, batch_size: 8, learning_rate: 3.0e-2, max_length: 96, precision: fp32, checkpoint_every: 3, warmup_ratio: 0.0}}
generate: {{max_new_tokens: 12, batch_size: 4}}
eval:
  rubric:
    - {{name: yo, check: ends_with, values: [よ。]}}
{extra}""", encoding="utf-8")
    return recipe


def train(recipe: Path, out: Path, *args: str):
    result = runner.invoke(app, ["train", str(recipe), "--out", str(out), *args])
    return result


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_training_lowers_the_loss_and_writes_a_complete_run_folder(tmp_path, tiny_model):
    run = tmp_path / "run"
    result = train(make_recipe(tmp_path, tiny_model), run)
    assert result.exit_code == 0, result.output
    for name in ("recipe.yaml", "manifest.json", "metrics.jsonl", "loss.png", "adapter/adapter_model.safetensors",
                 "adapter/adapter_config.json"):
        assert (run / name).is_file(), name
    losses = [m["loss"] for m in metrics(run) if "loss" in m]
    assert len(losses) == 12  # 4 epochs × 3 steps
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.5
    validation = [m["val_loss"] for m in metrics(run) if "val_loss" in m]
    assert len(validation) == 4 and validation[-1] < validation[0]
    # Token accuracy, logged each step and at each validation as TRL and OpenAI's fine-tuning report it: it rises.
    accuracy = [m["token_accuracy"] for m in metrics(run) if "loss" in m]
    held_out = [m["val_token_accuracy"] for m in metrics(run) if "val_loss" in m]
    assert len(accuracy) == 12 and len(held_out) == 4
    assert sum(accuracy[-3:]) / 3 > sum(accuracy[:3]) / 3 + 0.03 and held_out[-1] > held_out[0]
    # The last one is the share of validation answer tokens that argmax over the tuned model's full logits gets right.
    from shitate.data.formats import conversation, read_chat
    from shitate.data.templates import IGNORE_INDEX, encode_chat
    from shitate.models.inference import load_for_inference

    tuned = load_for_inference(str(run), dtype=torch.float32)
    right = total = 0
    with torch.no_grad():
        for _, record in read_chat(tmp_path / "validation.jsonl"):
            example = encode_chat(conversation(record, "子ども向けに答えてね。"), tuned.tokenizer, tuned.template, 96)
            logits = tuned.model(input_ids=torch.tensor([example["input_ids"]])).logits[0, :-1]
            targets = torch.tensor(example["labels"][1:])
            answered = targets != IGNORE_INDEX
            right += int((logits.argmax(-1) == targets)[answered].sum())
            total += int(answered.sum())
    assert 0 < right < total and abs(held_out[-1] - right / total) <= 1 / total
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["data"]["train"]["records"] == 24 and len(manifest["data"]["train"]["sha256"]) == 64
    assert manifest["template"] == "gemma" and manifest["steps"] == 12 and "finished" in manifest
    assert [p.name for p in (run / "checkpoints").iterdir()] and not list(run.glob(".*"))


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "gemma2", "gpt_neox", "gpt2"])
def test_a_model_folder_of_another_family_trains_and_answers(tmp_path, tokenizer, family, recwarn):
    # A GPT-2 (the seed's Japanese GPT-2) stopped with an AttributeError in the memory plan (its config says n_inner,
    # not intermediate_size), and PEFT warned on every run about its Conv1D layers. A Gemma 2 stopped on its first
    # step: neither SDPA nor the packed attention computed its soft-capped scores.
    from tiny_families import build_tiny

    model = build_tiny(family, tmp_path / family, tokenizer)
    run = tmp_path / "run"
    result = train(make_recipe(tmp_path, model), run)
    assert result.exit_code == 0, result.output
    assert not [w for w in recwarn if "fan_in_fan_out" in str(w.message)]
    validation = [m["val_loss"] for m in metrics(run) if "val_loss" in m]
    assert len(validation) == 4 and validation[-1] < validation[0]
    answered = runner.invoke(app, ["generate", str(run), "なんで空は", "--max-new-tokens", "4"])
    assert answered.exit_code == 0, answered.output


def test_a_qwen3_with_its_own_template_trains_on_multi_turn_chats_and_answers(tmp_path, tokenizer):
    # Qwen3's template writes an empty <think></think> block before the last answer only, so an earlier answer renders
    # differently once later turns follow: training refused every Qwen3 ("not prefix-stable, choose a built-in
    # template") until the answers were located in the whole conversation's rendering.
    from tiny_families import build_tiny

    tokenizer = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.add_tokens(["<think>", "</think>"])  # Qwen3's: added, not special
    tokenizer.chat_template = (Path(__file__).parents[1] / "assets/qwen3_chat_template.jinja").read_text(encoding="utf-8")
    model = build_tiny("qwen3", tmp_path / "qwen3", tokenizer)
    recipe = make_recipe(tmp_path, model)
    recipe.write_text(recipe.read_text(encoding="utf-8").replace("template: gemma", "template: auto"), encoding="utf-8")
    records = kids_records(64)
    two_turns = [{"messages": a["messages"] + b["messages"]} for a, b in zip(records[0::2], records[1::2])]
    write_jsonl(tmp_path / "validation.jsonl", two_turns[24:32])
    # Reasoning in an answer before the last question is dropped by the template: that record is named, nothing trains.
    reasoning = {"messages": [two_turns[1]["messages"][0], {"role": "assistant", "content": "<think>光</think>青いよ。"},
                              *two_turns[1]["messages"][2:]]}
    write_jsonl(tmp_path / "train.jsonl", [two_turns[0], reasoning, *two_turns[2:24]])
    refused = train(recipe, tmp_path / "refused")
    assert refused.exit_code == 1 and not (tmp_path / "refused").exists()
    assert "train.jsonl:2: messages: the answer '<think>光</think>青いよ。' is not in" in " ".join(str(refused.exception).split())
    write_jsonl(tmp_path / "train.jsonl", two_turns[:24])
    run = tmp_path / "run"
    result = train(recipe, run)
    assert result.exit_code == 0, result.output
    assert json.loads((run / "manifest.json").read_text())["template"] == "auto"
    losses = [m["loss"] for m in metrics(run) if "loss" in m]
    validation = [m["val_loss"] for m in metrics(run) if "val_loss" in m]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.3 and validation[-1] < validation[0]  # 6.57 → 6.10 here
    answered = runner.invoke(app, ["generate", str(run), "なんで空は", "--max-new-tokens", "4"])
    assert answered.exit_code == 0, answered.output


def test_sequences_longer_than_a_gpt2_s_learned_positions_are_refused_before_loading(tmp_path, tokenizer, monkeypatch):
    # GPT-2 has a table of 1024 learned positions: a longer example stopped training with an IndexError inside torch.
    from shitate.train import session
    from tiny_families import build_tiny

    model = build_tiny("gpt2", tmp_path / "gpt2", tokenizer)
    monkeypatch.setattr(session, "load_model", lambda *args, **kwargs: pytest.fail("the weights were loaded"))
    result = train(make_recipe(tmp_path, model), tmp_path / "run", "--set", "train.max_length=2048")
    assert result.exit_code == 1
    message = " ".join(str(result.exception).split())
    assert "train.max_length makes sequences of up to 2048 tokens" in message and "learned positions for 1024" in message
    assert not (tmp_path / "run").exists()


def test_a_base_model_whose_tokenizer_has_no_padding_or_turn_markers_trains_and_is_compared(tmp_path):
    # Llama 3's, GPT-2's and most base models' tokenizers have no padding token: compare and eval, which generate in
    # padded batches, stopped with transformers' "Asking to pad but the tokenizer does not have a padding token".
    from tiny_families import build_tiny, gpt2_like_tokenizer

    tokenizer = gpt2_like_tokenizer()
    assert tokenizer.pad_token is None
    model = build_tiny("llama", tmp_path / "llama", tokenizer)
    recipe = make_recipe(tmp_path, model)
    recipe.write_text(recipe.read_text(encoding="utf-8").replace("template: gemma", "template: auto"), encoding="utf-8")
    run = tmp_path / "run"
    assert train(recipe, run, "--set", "train.epochs=1").exit_code == 0
    assert json.loads((run / "manifest.json").read_text())["template"] == "plain"
    compared = runner.invoke(app, ["compare", str(model), str(run), str(tmp_path / "test.jsonl"), "--out",
                                   str(tmp_path / "compare.jsonl")])
    assert compared.exit_code == 0, compared.output
    rows = [json.loads(line) for line in (tmp_path / "compare.jsonl").read_text(encoding="utf-8").splitlines()]
    assert len(rows) == 8  # every test question answered, in batches of 4


def test_a_multimodal_gemma3_trains_its_language_model_only(tmp_path, tokenizer):
    # Gemma 3 from 4B up is one checkpoint with a vision tower: training stopped on an AttributeError (its top-level
    # config has no hidden_size), and LoRA's all-linear adapted the vision tower too.
    from conftest import write_jsonl
    from tiny_families import build_tiny

    model = build_tiny("gemma3_vision", tmp_path / "gemma3-vision", tokenizer)
    recipe = make_recipe(tmp_path, model)
    lora = tmp_path / "lora"
    result = train(recipe, lora, "--set", "train.epochs=1")
    assert result.exit_code == 0, result.output
    adapted = load_file(lora / "adapter" / "adapter_model.safetensors")
    assert adapted and all(".language_model." in name for name in adapted)

    full = tmp_path / "full"
    assert train(recipe, full, "--set", "train.epochs=1", "--set", "adapter.method=full").exit_code == 0
    before, after = load_file(model / "model.safetensors"), load_file(full / "model" / "model.safetensors")
    assert all(torch.equal(after[name], tensor) for name, tensor in before.items() if "vision_tower" in name)
    assert not torch.equal(after["language_model.model.layers.0.mlp.up_proj.weight"],
                           before["language_model.model.layers.0.mlp.up_proj.weight"])

    pairs = [{"prompt": r["messages"][0]["content"], "chosen": r["messages"][1]["content"], "rejected": "しらない。"}
             for r in kids_records(12)]
    write_jsonl(tmp_path / "pairs.jsonl", pairs)
    reward = train(recipe, tmp_path / "reward", "--set", "stage=reward", "--set", "data.train=pairs.jsonl",
                   "--set", "data.validation=pairs.jsonl", "--set", "data.test=null", "--set", "train.epochs=1")
    assert reward.exit_code == 0, reward.output


def test_resume_from_a_checkpoint_matches_an_uninterrupted_run(tmp_path, tiny_model):
    recipe = make_recipe(tmp_path, tiny_model)
    full = tmp_path / "full"
    assert train(recipe, full).exit_code == 0
    # A crash after step 9: the step-9 checkpoint survives, no final adapter.
    crashed = crashed_copy(full, tmp_path / "crashed", last_checkpoint=9)
    result = train(recipe, crashed, "--resume")
    assert result.exit_code == 0, result.output
    assert_same_adapter(full, crashed)
    assert [m["step"] for m in metrics(crashed) if "loss" in m] == list(range(1, 13))


def test_an_example_whose_whole_answer_is_past_max_length_is_dropped_with_a_warning(tmp_path, tiny_model):
    recipe = make_recipe(tmp_path, tiny_model)
    records = kids_records(24)
    long_prompt = {"messages": [{"role": "user", "content": "とても長い質問です。" * 40},
                                {"role": "assistant", "content": "答えだよ。"}]}
    write_jsonl(tmp_path / "train.jsonl", records[:2] + [long_prompt] + records[2:5] + [long_prompt] + records[5:])
    result = train(recipe, tmp_path / "run", "--set", "train.max_steps=1")
    assert result.exit_code == 0, result.output
    said = " ".join(result.output.split())  # rich wraps at the terminal width, which depends on the tmp path
    assert "dropped 2 example(s) whose whole answer lies past max_length 96 (line 3, 7)" in said
    assert "24 train / 8 validation examples" in said

    refused = train(recipe, tmp_path / "strict", "--set", "train.overlong=error")
    assert isinstance(refused.exception, DataError) and not (tmp_path / "strict").exists()
    assert [(p.line, p.message) for p in refused.exception.problems] == [
        (3, "no answer tokens left within max_length 96"), (7, "no answer tokens left within max_length 96")]


def test_a_damaged_newest_checkpoint_is_skipped_with_a_warning(tmp_path, tiny_model):
    recipe = make_recipe(tmp_path, tiny_model)
    full = tmp_path / "full"
    assert train(recipe, full, "--set", "train.keep_checkpoints=3").exit_code == 0
    crashed = crashed_copy(full, tmp_path / "crashed", last_checkpoint=9)
    (crashed / "checkpoints/step-9/state.pt").write_bytes(b"\x80\x02 cut short")
    (crashed / "checkpoints/.step-12.abc").mkdir()  # the temporary folder of a write that was killed
    result = train(recipe, crashed, "--resume", "--set", "train.keep_checkpoints=3")
    assert result.exit_code == 0, result.output
    said = "".join(result.output.split())  # the console wraps long paths anywhere
    assert f"{crashed}/checkpoints/step-9isdamaged(UnpicklingError" in said and "fromstep-6." in said
    assert_same_adapter(full, crashed)
    assert [m["step"] for m in metrics(crashed) if "loss" in m] == list(range(1, 13))
    assert not list((crashed / "checkpoints").glob(".step-*"))


def test_an_existing_run_is_never_overwritten_without_force(tmp_path, tiny_model):
    recipe = make_recipe(tmp_path, tiny_model)
    run = tmp_path / "run"
    assert train(recipe, run, "--set", "train.max_steps=1").exit_code == 0
    result = train(recipe, run, "--set", "train.max_steps=1")
    assert isinstance(result.exception, ConfigError) and "--resume" in str(result.exception)
    result = train(recipe, run, "--set", "train.max_steps=2", "--resume")
    assert isinstance(result.exception, ConfigError) and "train.max_steps" in str(result.exception)
    assert train(recipe, run, "--set", "train.max_steps=1", "--force").exit_code == 0


def test_full_fine_tune_in_bf16_autocast_writes_a_model(tmp_path, tiny_model):
    run = tmp_path / "run"
    recipe = make_recipe(tmp_path, tiny_model)
    result = train(recipe, run, "--set", "adapter.method=full", "--set", "train.precision=bf16",
                   "--set", "train.learning_rate=1e-3")
    assert result.exit_code == 0, result.output
    assert (run / "model" / "model.safetensors").is_file() and (run / "model" / "tokenizer.json").is_file()
    losses = [m["loss"] for m in metrics(run) if "loss" in m]
    assert losses[-1] < losses[0]


def test_a_tuned_model_learns_to_stop_at_the_end_of_its_turn(tmp_path, tiny_model):
    """After overfitting one answer, greedy generation writes exactly it and stops at <end_of_turn>, not EOS."""
    from shitate.config import GenerateSpec
    from shitate.models.inference import answer, load_for_inference

    record = kids_records(1)[0]
    write_jsonl(tmp_path / "one.jsonl", [record] * 8)
    (tmp_path / "recipe.yaml").write_text(f"""
name: stop
model: {tiny_model}
template: gemma
data: {{train: one.jsonl}}
adapter: {{method: full}}
train: {{epochs: 40, batch_size: 8, learning_rate: 3.0e-3, precision: fp32, warmup_ratio: 0.0, lr_scheduler: constant}}
""", encoding="utf-8")
    assert train(tmp_path / "recipe.yaml", tmp_path / "run").exit_code == 0
    loaded = load_for_inference(str(tmp_path / "run"))
    question = record["messages"][:1]
    text = loaded.template(question, add_generation_prompt=True)
    ids = loaded.tokenizer(text, return_tensors="pt", add_special_tokens=False).to(loaded.model.device)
    end_of_turn = loaded.tokenizer.convert_tokens_to_ids("<end_of_turn>")
    output = loaded.model.generate(**ids, max_new_tokens=60, do_sample=False, eos_token_id=[end_of_turn],
                                   pad_token_id=loaded.tokenizer.pad_token_id)[0, ids["input_ids"].shape[1]:]
    assert output[-1].item() == end_of_turn and len(output) < 60
    assert answer(loaded, [question], GenerateSpec(max_new_tokens=60)) == [record["messages"][1]["content"]]


def test_dry_run_reports_speed_memory_and_time_and_keeps_nothing(tmp_path, tiny_model):
    run = tmp_path / "run"
    result = train(make_recipe(tmp_path, tiny_model), run, "--dry-run")
    assert result.exit_code == 0, result.output
    output = " ".join(result.output.split())
    assert "tokens/s" in output and "peak memory" in output and "whole run 12 steps, about" in output
    assert "on 8 GPUs ddp" in output and "zero3" in output
    assert not run.exists()


def test_a_run_that_cannot_fit_is_refused_before_training(tmp_path, tiny_model, monkeypatch):
    from shitate.train import session

    monkeypatch.setattr(session, "available_bytes", lambda device: 1_000)
    result = train(make_recipe(tmp_path, tiny_model), tmp_path / "run")
    assert isinstance(result.exception, ConfigError)
    message = str(result.exception)
    assert "more memory but 0.0 GB is free" in message and "train.batch_size (now 8)" in message
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
    assert "train.precision: bf16" not in message  # the recipe asked for fp32 itself


def test_a_run_too_big_in_the_fp32_auto_chose_names_bf16_as_a_way_to_fit(tmp_path, tiny_model, monkeypatch):
    from shitate.train import session

    monkeypatch.setattr(session, "available_bytes", lambda device: 6e9)
    monkeypatch.setattr(session, "bf16_supported", lambda device: True)
    monkeypatch.setattr(session, "pick_precision", lambda setting, device: ("fp32", "fp32 (measured faster)"))
    monkeypatch.setattr(session, "training_bytes", lambda config, precision, *args, **kwargs: 8e9 if precision == "fp32"
                        else 4e9)  # the tiny model needs almost nothing: sizes of a model that does not fit
    recipe = make_recipe(tmp_path, tiny_model)
    recipe.write_text(recipe.read_text().replace("precision: fp32", "precision: auto"), encoding="utf-8")
    message = " ".join(str(train(recipe, tmp_path / "run").exception).split())
    assert "needs about 8.0 GB more memory but 6.0 GB is free" in message
    assert "set train.precision: bf16 (auto chose fp32 as this CPU's faster arithmetic; bf16 needs about 4.0 GB)" in message


def launched(recipe: Path, run: Path, nproc: int, *extra: str, port: int = 29517):
    """`shitate train RECIPE --nproc N`: torchrun on a CPU, gloo between the processes, one thread each."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": "",
           "PET_MASTER_PORT": str(port)}  # torchrun reads its options from PET_* variables
    return subprocess.run([sys.executable, "-m", "shitate.cli", "train", str(recipe), "--nproc", str(nproc),
                           "--out", str(run), *extra], capture_output=True, text=True, env=env, timeout=300)


# Two processes take the same steps as one up to the order of floating-point sums (each process adds its half,
# then gloo adds the halves): 3e-5 at most in the loss over 12 steps at a learning rate of 3e-2 (Intel Xeon).
DATA_PARALLEL_TOLERANCE = 1e-3


def test_two_processes_follow_the_loss_curve_of_one_with_the_same_global_batch(tmp_path, tiny_model):
    recipe = make_recipe(tmp_path, tiny_model)
    no_dropout = ("--set", "adapter.dropout=0.0")  # dropout masks are drawn per process
    for nproc in (1, 2):
        result = launched(recipe, tmp_path / f"run-{nproc}", nproc, *no_dropout)
        assert result.returncode == 0, result.stderr[-3000:]
    one, two = (metrics(tmp_path / f"run-{n}") for n in (1, 2))
    assert json.loads((tmp_path / "run-2" / "manifest.json").read_text())["processes"] == 2
    losses = [[m["loss"] for m in run if "loss" in m] for run in (one, two)]
    assert len(losses[1]) == 12 and sum(losses[1][-3:]) < sum(losses[1][:3]) - 1.0
    gaps = [abs(a - b) for a, b in zip(*losses)]
    validation = [[m["val_loss"] for m in run if "val_loss" in m] for run in (one, two)]
    print(f"1 vs 2 processes, largest loss difference: {max(gaps):.2e} (validation {max(abs(a - b) for a, b in zip(*validation)):.2e})")
    assert max(gaps) < DATA_PARALLEL_TOLERANCE
    assert all(abs(a - b) < DATA_PARALLEL_TOLERANCE for a, b in zip(*validation))
    assert [p.name for p in (tmp_path / "run-2").iterdir()] and not list((tmp_path / "run-2").glob(".*"))


def test_micro_batching_by_tokens_gives_the_same_step(tmp_path, tiny_model):
    """Accumulating gradients over token-bounded micro-batches trains the same weights as one batch."""
    recipe = make_recipe(tmp_path, tiny_model)
    common = ["--set", "train.max_steps=3", "--set", "adapter.dropout=0.0"]
    assert train(recipe, tmp_path / "whole", *common, "--set", "train.micro_batch_tokens=null").exit_code == 0
    assert train(recipe, tmp_path / "micro", *common, "--set", "train.micro_batch_tokens=150").exit_code == 0
    losses = [[m["loss"] for m in metrics(tmp_path / run) if "loss" in m] for run in ("whole", "micro")]
    torch.testing.assert_close(torch.tensor(losses[1]), torch.tensor(losses[0]), rtol=1e-5, atol=1e-6)
    whole = load_file(tmp_path / "whole" / "adapter" / "adapter_model.safetensors")
    micro = load_file(tmp_path / "micro" / "adapter" / "adapter_model.safetensors")
    for name in whole:
        # Adam divides by the gradient's own size, so rounding differences show up to ~1e-4 in the weights.
        torch.testing.assert_close(micro[name], whole[name], rtol=0, atol=1e-3)


def test_answers_are_checked_during_training(tmp_path, tiny_model, monkeypatch):
    import shitate.models.inference as inference
    from shitate.evals import metrics as scoring

    recipe = make_recipe(tmp_path, tiny_model, extra="  every_steps: 4\n  examples: 3\n")
    validation = [(r["messages"][0]["content"], r["messages"][1]["content"]) for r in kids_records(40)[24:27]]
    # The model in training answers; here its answers are fixed, so the logged scores have known values.
    fixed = [validation[0][1], "ちがうよ。", "ちがう"]
    seen = []

    def answered(loaded, conversations, spec):
        seen.append([c[-1]["content"] for c in conversations])
        return fixed

    monkeypatch.setattr(inference, "answer", answered)
    result = train(recipe, tmp_path / "run", "--set", "train.max_steps=8")
    assert result.exit_code == 0, result.output
    checks = [m for m in metrics(tmp_path / "run") if "eval_chrF" in m]
    assert [m["step"] for m in checks] == [4, 8] and seen == [[q for q, _ in validation]] * 2
    expected_yo = sum(a.endswith("よ。") for a in fixed) / 3
    expected_chrf = scoring.chrf(fixed, [a for _, a in validation])
    assert 0 < expected_chrf < 100 and expected_yo == 2 / 3
    assert all(m["eval_rubric/yo"] == pytest.approx(expected_yo) and m["eval_chrF"] == pytest.approx(expected_chrf)
               for m in checks)


def test_an_answer_check_without_its_package_stops_before_training(tmp_path, tiny_model, monkeypatch):
    import sys

    from shitate.errors import ShitateError

    monkeypatch.setitem(sys.modules, "sacrebleu", None)  # as if shitate[eval] were not installed
    recipe = make_recipe(tmp_path, tiny_model, extra="  every_steps: 4\n  examples: 3\n")
    result = train(recipe, tmp_path / "run", "--set", "train.max_steps=8")
    assert isinstance(result.exception, ShitateError)
    assert "chrF needs the sacrebleu package: pip install 'shitate[eval]'" in str(result.exception)
    assert not (tmp_path / "run").exists()  # nothing trained, nothing half-written


def test_each_adapter_method_trains_with_a_falling_loss(tmp_path, tiny_model):
    recipe = make_recipe(tmp_path, tiny_model)
    for method, learning_rate in (("dora", 3e-2), ("loraplus", 3e-3), ("full", 1e-3)):
        run = tmp_path / method
        result = train(recipe, run, "--set", f"adapter.method={method}", "--set", f"train.learning_rate={learning_rate}")
        assert result.exit_code == 0, result.output
        losses = [m["loss"] for m in metrics(run) if "loss" in m]
        assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.3, (method, losses)
        if method == "dora":
            # DoRA layers run PEFT's forward; training says so instead of pretending to be lean.
            assert "run PEFT's own forward" in " ".join(result.output.split())
            assert "lora_magnitude_vector" in "".join(load_file(run / "adapter" / "adapter_model.safetensors"))


def test_loraplus_trains_the_b_matrices_at_ratio_times_the_learning_rate(tmp_path, tiny_model):
    from shitate.runs import RunFolder

    run = tmp_path / "run"
    assert train(make_recipe(tmp_path, tiny_model), run, "--set", "adapter.method=loraplus", "--set",
                 "adapter.loraplus_ratio=8", "--set", "train.max_steps=1", "--set", "train.checkpoint_every=1").exit_code == 0
    _, state, _ = RunFolder.read_checkpoint(RunFolder(run).latest_checkpoint())
    groups = [g for g in state["optimizer"]["param_groups"] if g["params"]]
    rates = sorted({g["initial_lr"] for g in groups})  # the schedule scales every group alike from here
    assert len(rates) == 2 and rates[1] == pytest.approx(8 * rates[0])
    # 2 layers × 7 adapted linears: 14 A matrices at the base rate, 14 B matrices at 8 times it.
    assert [sum(len(g["params"]) for g in groups if g["initial_lr"] == rate) for rate in rates] == [14, 14]


@pytest.mark.parametrize("installed", [None, "0.45.5"])
def test_qlora_without_a_bitsandbytes_that_can_train_here_is_refused_before_anything_loads(tmp_path, tiny_model,
                                                                                          monkeypatch, installed):
    import importlib.metadata

    import transformers

    def version(name):
        if name != "bitsandbytes":
            return original(name)
        if installed is None:
            raise importlib.metadata.PackageNotFoundError(name)
        return installed

    original = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version", version)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained",
                        lambda *a, **k: pytest.fail("the model was loaded before the refusal"))
    run = tmp_path / "run"
    result = train(make_recipe(tmp_path, tiny_model), run, "--set", "adapter.method=qlora")
    assert isinstance(result.exception, ConfigError)
    if installed is None:
        assert "bitsandbytes package, which is not installed: pip install 'shitate[qlora]'" in str(result.exception)
    elif not torch.cuda.is_available():
        assert "bitsandbytes 0.49 or later to train on a CPU (this machine has 0.45.5)" in str(result.exception)
    assert "adapter.method: lora" in str(result.exception) and not run.exists()


def test_a_4_bit_base_passes_the_same_gradients_as_its_dequantised_weights_after_a_validation_pass(tiny_model):
    # bitsandbytes repacks 4-bit weights for its CPU inference kernel at a forward without gradients in eval mode and
    # then uses that kernel, which has no backward, in training too: the gradients through the frozen layers were lost.
    pytest.importorskip("bitsandbytes")
    import copy

    import bitsandbytes

    from shitate.config import AdapterSpec
    from shitate.models.adapters import attach, count_parameters
    from shitate.models.load import load_model, resolve

    torch.manual_seed(0)
    model = attach(load_model(resolve(str(tiny_model), progress=False), dtype=torch.float32, four_bit=True),
                   AdapterSpec(method="qlora", dropout=0.0))
    for name, parameter in model.named_parameters():
        if "lora_B" in name:  # zero at the start, which would hide a gradient lost below them
            parameter.data.normal_(0, 0.1)
    dequantised = copy.deepcopy(model)
    for module in dequantised.modules():
        if isinstance(getattr(module, "base_layer", None), bitsandbytes.nn.Linear4bit):
            quantised = module.base_layer
            plain = torch.nn.Linear(quantised.in_features, quantised.out_features, bias=False)
            plain.weight = torch.nn.Parameter(bitsandbytes.functional.dequantize_4bit(
                quantised.weight.data, quantised.weight.quant_state).float(), requires_grad=False)
            module.base_layer = plain
    ids = torch.randint(0, 200, (2, 12))
    model.eval()
    with torch.no_grad():
        model(input_ids=ids)
    model.train()

    def gradients(module):
        module(input_ids=ids, labels=ids).loss.backward()
        return {n: p.grad for n, p in module.named_parameters() if p.requires_grad}

    assert count_parameters(model) == count_parameters(dequantised)  # a 4-bit weight's elements, not its bytes
    quantised_gradients, plain_gradients = gradients(model), gradients(dequantised)
    assert len(plain_gradients) == 28 and plain_gradients.keys() == quantised_gradients.keys()
    for name, expected in plain_gradients.items():
        torch.testing.assert_close(quantised_gradients[name], expected, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None,
                    reason="QLoRA needs bitsandbytes (the dev extra installs it)")
def test_qlora_trains_an_adapter_on_a_4_bit_base_and_generates_with_it(tmp_path, tiny_model):
    from shitate.models.load import load_model, resolve
    from shitate.train.session import Session

    seen = {}
    original = Session.start

    def spy(self, model, *args, **kwargs):
        seen["quantised"] = sorted({type(m).__name__ for m in model.modules() if "4bit" in type(m).__name__})
        return original(self, model, *args, **kwargs)

    run = tmp_path / "run"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Session, "start", spy)
        result = train(make_recipe(tmp_path, tiny_model), run, "--set", "adapter.method=qlora",
                       "--set", "train.precision=bf16")
    assert result.exit_code == 0, result.output
    assert seen["quantised"] == ["Linear4bit"]
    losses = [m["loss"] for m in metrics(run) if "loss" in m]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.5
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["peak_gpu_gb" if torch.cuda.is_available() else "peak_rss_gb"] > 0
    # The adapter loads on the full-precision base like any LoRA run's and has learnt something.
    model = load_model(resolve(str(run), progress=False))
    assert any(p.abs().sum() > 0 for n, p in model.named_parameters() if "lora_B" in n)
    answer = runner.invoke(app, ["generate", str(run), "なんで空は青いの?", "--max-new-tokens", "8"])
    assert answer.exit_code == 0, answer.output
    # The 4-bit base is quantised afresh on resume: the same numbers, so the same adapter as without the crash.
    crashed = crashed_copy(run, tmp_path / "crashed", last_checkpoint=9)
    result = train(make_recipe(tmp_path, tiny_model), crashed, "--resume", "--set", "adapter.method=qlora",
                   "--set", "train.precision=bf16")
    assert result.exit_code == 0, result.output
    assert "from step-9." in " ".join(result.output.split())
    assert_same_adapter(run, crashed)


def test_ctrl_c_saves_a_checkpoint_exits_130_and_resume_finishes_the_same_run(tmp_path, tiny_model, monkeypatch):
    import contextlib
    import sys

    from shitate import cli
    from shitate.train.session import Session

    recipe = make_recipe(tmp_path, tiny_model)
    assert train(recipe, tmp_path / "full").exit_code == 0
    original = Session.interrupts

    @contextlib.contextmanager
    def interrupted_at_step_5(self):
        with original(self):
            self.stop_requested = lambda: sum("loss" in r for r in self.run.metrics()) >= 5  # five steps logged
            yield

    monkeypatch.setattr(Session, "interrupts", interrupted_at_step_5)
    monkeypatch.setattr(sys, "argv", ["shitate", "train", str(recipe), "--out", str(tmp_path / "stopped")])
    with pytest.raises(SystemExit) as stopped:
        cli.main()
    assert stopped.value.code == 130
    assert sorted(p.name for p in (tmp_path / "stopped" / "checkpoints").iterdir()) == ["step-3", "step-5"]
    monkeypatch.setattr(Session, "interrupts", original)
    assert train(recipe, tmp_path / "stopped", "--resume").exit_code == 0
    expected = load_file(tmp_path / "full" / "adapter" / "adapter_model.safetensors")
    resumed = load_file(tmp_path / "stopped" / "adapter" / "adapter_model.safetensors")
    for name in expected:  # dropout draws included: the random states came back with the checkpoint
        torch.testing.assert_close(resumed[name], expected[name], rtol=0, atol=1e-6)


def test_checkpoints_keep_every_random_state(tmp_path, tiny_model):
    from shitate.runs import RunFolder

    run = tmp_path / "run"
    assert train(make_recipe(tmp_path, tiny_model), run, "--set", "train.max_steps=3").exit_code == 0
    _, state, progress = RunFolder.read_checkpoint(RunFolder(run).latest_checkpoint())
    assert {"torch", "python"} <= state["random"].keys() and progress["step"] == 3
    assert {"optimizer", "scheduler"} <= state.keys()


def test_mixed_sources_are_drawn_by_weight_and_reported_in_the_manifest(tmp_path, tiny_model):
    recipe = make_recipe(tmp_path, tiny_model)
    general = [{"messages": [{"role": "user", "content": f"こんにちは{i}"}, {"role": "assistant", "content": "こんにちは。"}]}
               for i in range(40)]
    write_jsonl(tmp_path / "general.jsonl", general)
    result = train(recipe, tmp_path / "run", "--set", "data.train=[{path: train.jsonl}, {path: general.jsonl, weight: 0.2}]",
                   "--set", "train.max_steps=2")
    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    mix = {Path(s["path"]).name: s for s in manifest["data_mix"]}
    assert mix["train.jsonl"]["used"] == 24 and mix["general.jsonl"]["used"] == 8
    assert mix["general.jsonl"]["share"] == 0.25 and [Path(s["path"]).name for s in manifest["data"]["train"]] == [
        "train.jsonl", "general.jsonl"]
    assert "data mix: train.jsonl 24 (75%), general.jsonl 8 (25%)" in " ".join(result.output.split())


@pytest.mark.parametrize("stage", ["sft", "pretrain"])
def test_no_tokenizer_is_kept_alive_while_training(tmp_path, tiny_model, monkeypatch, stage):
    # Gemma 3's tokenizer holds ~0.4 GB that a training step never uses: it must be gone by the first step.
    import gc
    import importlib
    import weakref

    from shitate.train import loop

    if stage == "sft":
        recipe = make_recipe(tmp_path, tiny_model)
    else:
        from test_pretrain import make_pretrain_recipe

        recipe = make_pretrain_recipe(tmp_path, tiny_model)
    stage_module = importlib.import_module(f"shitate.train.{stage}")
    loaded, alive_at_steps = [], []
    original_load, original_step = stage_module.load_tokenizer, loop.train_step

    def recorded_load(source):
        tokenizer = original_load(source)
        loaded.append(weakref.ref(tokenizer))
        return tokenizer

    def counting_step(*args, **kwargs):
        gc.collect()
        alive_at_steps.append(sum(ref() is not None for ref in loaded))
        return original_step(*args, **kwargs)

    monkeypatch.setattr(stage_module, "load_tokenizer", recorded_load)
    monkeypatch.setattr(loop, "train_step", counting_step)
    result = train(recipe, tmp_path / "run", "--set", "train.max_steps=2")
    assert result.exit_code == 0, result.output
    assert len(loaded) == 1 and alive_at_steps == [0, 0]


def test_audit_names_what_made_a_run_and_catches_a_changed_file(tmp_path, tiny_model):
    run = tmp_path / "run"
    recipe = make_recipe(tmp_path, tiny_model)
    assert train(recipe, run, "--set", "train.max_steps=1").exit_code == 0
    manifest = json.loads((run / "manifest.json").read_text())
    assert any(path.endswith("model.safetensors") for path in manifest["model_source"]["weights"])
    assert set(manifest["outputs"]) == {"adapter"}
    result = runner.invoke(app, ["audit", str(run)])
    assert result.exit_code == 0 and "All 5 files match" in " ".join(result.output.split()), result.output
    with (tmp_path / "train.jsonl").open("a", encoding="utf-8") as handle:
        handle.write(json.dumps({"messages": [{"role": "user", "content": "足した"}, {"role": "assistant", "content": "よ"}]}, ensure_ascii=False) + "\n")
    (tmp_path / "test.jsonl").unlink()
    result = runner.invoke(app, ["audit", str(run)])
    assert result.exit_code == 1
    output = " ".join(result.output.split())
    assert "CHANGED data train" in output and "MISSING data test" in output
    assert "2 of 5 files" in str(result.exception)


def test_pickle_weights_are_refused_unless_allowed(tmp_path, tiny_model, monkeypatch):
    import shutil

    from safetensors.torch import load_file as read_safetensors

    pickled = tmp_path / "pickled"  # the tiny model as an older checkpoint: a pickled state dict
    shutil.copytree(tiny_model, pickled)
    torch.save(read_safetensors(pickled / "model.safetensors"), pickled / "pytorch_model.bin")
    (pickled / "model.safetensors").unlink()
    assert (pickled / "pytorch_model.bin").is_file() and not list(pickled.glob("*.safetensors"))
    refused = runner.invoke(app, ["generate", str(pickled), "空は", "--max-new-tokens", "2"])
    assert refused.exit_code == 1 and "pytorch_model.bin" in str(refused.exception)
    assert "--allow-pickle" in str(refused.exception)
    monkeypatch.setenv("SHITATE_ALLOW_PICKLE", "0")  # restored after the test: the flag sets it in this process
    allowed = runner.invoke(app, ["--allow-pickle", "generate", str(pickled), "空は", "--max-new-tokens", "2"])
    assert allowed.exit_code == 0, allowed.output
