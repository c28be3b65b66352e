"""Stages reward, dpo and orpo end to end on a tiny Gemma 3: each moves the model towards the chosen answers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from conftest import assert_same_adapter, crashed_copy, quantised_layer_types, write_jsonl
from shitate.cli import app
from shitate.errors import TrainingDiverged

runner = CliRunner()

QUESTIONS = ["空はなぜ青いの?", "海はなぜしょっぱいの?", "雨はどこから来るの?", "虹はなぜできるの?", "夜はなぜ暗いの?",
             "風はなぜふくの?", "雪はなぜ白いの?", "月はなぜ光るの?", "星はなぜ光るの?", "雷はなぜ鳴るの?"]


def make_recipe(folder: Path, model: Path, stage: str, extra: str = "") -> Path:
    # A checkable preference: answers that end with 〜だよ。 are chosen over curt ones.
    pairs = [{"prompt": q, "chosen": f"{q[:2]}のことはね、ひかりのせいだよ。", "rejected": "しらない。"} for q in QUESTIONS]
    write_jsonl(folder / "train.jsonl", pairs[:8] * 2)
    write_jsonl(folder / "validation.jsonl", pairs[8:])
    recipe = folder / f"{stage}.yaml"
    recipe.write_text(f"""
name: tiny-{stage}
model: {model}
template: gemma
stage: {stage}
data: {{train: train.jsonl, validation: validation.jsonl}}
adapter: {{method: lora, r: 4, alpha: 8, dropout: 0.0}}
train: {{epochs: 3, batch_size: 4, learning_rate: 1.0e-2, max_length: 64, precision: fp32, checkpoint_every: 4, warmup_ratio: 0.0}}
{extra}""", encoding="utf-8")
    return recipe


def train(recipe: Path, out: Path, *args: str):
    return runner.invoke(app, ["train", str(recipe), "--out", str(out), *args])


def validations(run: Path) -> list[dict]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if "val_loss" in r]


@pytest.mark.parametrize("stage, statistic", [("dpo", "val_reward_margin"), ("orpo", "val_chosen_nll"),
                                              ("reward", "val_reward_margin")])
def test_each_preference_stage_moves_the_model_towards_the_chosen_answers(tmp_path, tiny_model, stage, statistic):
    run = tmp_path / "run"
    result = train(make_recipe(tmp_path, tiny_model, stage), run)
    assert result.exit_code == 0, result.output
    before, after = validations(run)[0], validations(run)[-1]
    assert after["val_loss"] < before["val_loss"]
    if stage == "orpo":
        assert after[statistic] < before[statistic] - 0.5
    else:
        assert after[statistic] > before[statistic] + 0.5
    accuracy = "val_accuracy" if stage == "reward" else "val_preference_accuracy"
    assert after[accuracy] == 1.0
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["stage"] == stage and manifest[accuracy[4:]]["after"] == 1.0
    # Each step logs the same statistics on its own pairs, as TRL's trainers do: they move the same way.
    steps = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    moved = [step[statistic[4:]] for step in steps]
    assert len(moved) == len(steps) > 2
    assert (moved[-1] < moved[0]) if stage == "orpo" else (moved[-1] > moved[0])
    if stage == "reward":
        assert (run / "adapter" / "reward_head.safetensors").is_file()


def test_dpo_under_qlora_moves_towards_the_chosen_answers_on_a_4_bit_base(tmp_path, tiny_model, monkeypatch):
    # The reference is the 4-bit base with the adapter switched off, as under lora.
    pytest.importorskip("bitsandbytes")
    quantised = quantised_layer_types(monkeypatch)
    run = tmp_path / "run"
    result = train(make_recipe(tmp_path, tiny_model, "dpo"), run, "--set", "adapter.method=qlora")
    assert result.exit_code == 0, result.output
    assert quantised == {"Linear4bit"}
    before, after = validations(run)[0], validations(run)[-1]
    assert before["val_reward_margin"] == 0.0 and after["val_reward_margin"] > 0.5
    assert after["val_preference_accuracy"] == 1.0


def test_a_bf16_base_trains_in_fp32_arithmetic_with_its_fp32_copys_numbers(tmp_path, tiny_model, monkeypatch):
    # precision fp32 (what `auto` picks on a CPU whose fp32 matmul is the faster) keeps a bf16 base in bf16 and widens
    # each layer as it runs: the same numbers as an fp32 copy of the model, at half its weight memory.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from shitate.train import session

    narrow, wide = tmp_path / "bf16", tmp_path / "fp32"
    AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.bfloat16).save_pretrained(narrow)
    AutoModelForCausalLM.from_pretrained(narrow, dtype=torch.float32).save_pretrained(wide)
    for folder in (narrow, wide):
        AutoTokenizer.from_pretrained(tiny_model).save_pretrained(folder)
    loaded = []
    original = session.load_model
    monkeypatch.setattr(session, "load_model", lambda source, dtype, **kw: loaded.append(dtype) or original(source, dtype, **kw))
    runs = {}
    for name, model in (("bf16", narrow), ("fp32", wide)):
        runs[name] = tmp_path / f"run-{name}"
        result = train(make_recipe(tmp_path, model, "orpo"), runs[name])
        assert result.exit_code == 0, result.output
    assert loaded == [torch.bfloat16, torch.float32]
    before, copy_before = validations(runs["bf16"])[0], validations(runs["fp32"])[0]
    # Before the first step the adapter adds nothing (B = 0): the two models are the same function.
    assert before["val_loss"] == pytest.approx(copy_before["val_loss"], rel=1e-6)
    assert validations(runs["bf16"])[-1]["val_chosen_nll"] < before["val_chosen_nll"] - 0.5


def test_dpo_reference_is_computed_once_and_resume_is_exact(tmp_path, tiny_model, monkeypatch):
    from shitate.train import preference

    calls = []
    original = preference.reference_logps
    monkeypatch.setattr(preference, "reference_logps", lambda *a, **k: calls.append(1) or original(*a, **k))
    recipe = make_recipe(tmp_path, tiny_model, "dpo")
    full = tmp_path / "full"
    assert train(recipe, full).exit_code == 0
    assert len(calls) == 2  # train and validation pairs, once each, for 3 epochs
    saved = json.loads((full / "reference_logps.json").read_text())
    assert len(saved["train"]) == 16 and len(saved["validation"]) == 2
    crashed = crashed_copy(full, tmp_path / "crashed", last_checkpoint=8)
    result = train(recipe, crashed, "--resume")
    assert result.exit_code == 0, result.output
    assert len(calls) == 2  # read back from the run folder, not recomputed
    assert_same_adapter(full, crashed)


def test_a_loss_that_is_not_a_number_stops_training_and_keeps_the_last_checkpoint(tmp_path, tiny_model, monkeypatch):
    from shitate.train import preference

    original, steps = preference.dpo_losses, []

    def diverging(*args, **kwargs):
        losses = original(*args, **kwargs)
        if torch.is_grad_enabled():
            steps.append(1)
        return losses * float("nan") if len(steps) > 5 else losses

    monkeypatch.setattr(preference, "dpo_losses", diverging)
    run = tmp_path / "run"
    result = train(make_recipe(tmp_path, tiny_model, "dpo"), run)
    assert isinstance(result.exception, TrainingDiverged), result.output
    assert "nan" in str(result.exception) and "--resume" in str(result.exception)
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step-4"] and not (run / "adapter").exists()


def test_a_chat_file_given_to_a_preference_stage_is_refused_with_its_line(tmp_path, tiny_model):
    recipe = make_recipe(tmp_path, tiny_model, "dpo")
    write_jsonl(tmp_path / "train.jsonl", [{"messages": [{"role": "user", "content": "Q"},
                                                          {"role": "assistant", "content": "A"}]}])
    result = train(recipe, tmp_path / "run")
    message = str(result.exception)
    assert result.exit_code == 1 and "train.jsonl:1: not a preference pair" in message and "chat record" in message


def test_score_ranks_answers_with_a_trained_reward_model(tmp_path, tiny_model):
    run = tmp_path / "reward"
    assert train(make_recipe(tmp_path, tiny_model, "reward"), run).exit_code == 0
    write_jsonl(tmp_path / "answers.jsonl", [{"prompt": "雪はなぜ白いの?", "answer": "しらない。"},
                                             {"prompt": "雪はなぜ白いの?", "answer": "雪はのことはね、ひかりのせいだよ。"}])
    result = runner.invoke(app, ["score", str(run), str(tmp_path / "answers.jsonl"), "--out", str(tmp_path / "s.jsonl")])
    assert result.exit_code == 0, result.output
    curt, kind = [json.loads(line)["score"] for line in (tmp_path / "s.jsonl").read_text().splitlines()]
    assert kind > curt
    refused = runner.invoke(app, ["score", str(tiny_model), str(tmp_path / "answers.jsonl")])
    assert refused.exit_code == 1 and "not a reward model" in str(refused.exception)


def test_eval_reports_preference_accuracy_before_and_after(tmp_path, tiny_model):
    run = tmp_path / "dpo"
    recipe = make_recipe(tmp_path, tiny_model, "dpo")
    assert train(recipe, run).exit_code == 0
    result = runner.invoke(app, ["eval", str(run), "--pairs", str(tmp_path / "validation.jsonl"), "--out",
                                 str(tmp_path / "eval")])
    assert result.exit_code == 0, result.output
    found = json.loads((tmp_path / "eval" / "results.json").read_text())["metrics"]
    assert found["tuned"]["preference accuracy"] == 1.0
    assert found["tuned"]["log-prob margin per token"] > found["base"]["log-prob margin per token"] + 0.5
    assert found["tuned"]["implicit reward accuracy"] == 1.0 and "implicit reward accuracy" not in found["base"]


def test_dpo_in_two_processes_follows_the_loss_curve_of_one(tmp_path, tiny_model):
    from test_train import DATA_PARALLEL_TOLERANCE, launched

    recipe = make_recipe(tmp_path, tiny_model, "dpo")
    for nproc in (1, 2):
        result = launched(recipe, tmp_path / f"run-{nproc}", nproc, port=29518)
        assert result.returncode == 0, result.stderr[-3000:]
    losses = [[json.loads(line)["loss"] for line in (tmp_path / f"run-{n}" / "metrics.jsonl").read_text().splitlines()
               if '"loss"' in line] for n in (1, 2)]
    margins = [[v["val_reward_margin"] for v in validations(tmp_path / f"run-{n}")] for n in (1, 2)]
    print(f"dpo, 1 vs 2 processes, largest loss difference: {max(abs(a - b) for a, b in zip(*losses)):.2e}")
    assert len(losses[1]) == 12 and max(abs(a - b) for a, b in zip(*losses)) < DATA_PARALLEL_TOLERANCE
    assert margins[1][-1] > margins[1][0] + 0.5
    assert max(abs(a - b) for a, b in zip(*margins)) < DATA_PARALLEL_TOLERANCE


def test_before_the_first_step_dpo_s_implicit_rewards_are_exactly_zero(tmp_path, tokenizer):
    # Before training the policy is the reference, so every implicit reward is 0. The reference pass batched the
    # validation pairs otherwise than validation does, and on a model wide enough for the matmul kernels to depend on
    # the batch (here 512; the default model in the dpo_ja example) the margins were rounding noise of ~1e-6 whose
    # signs read as an "accuracy" (0.0 here, 0.69 there) before anything was trained.
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    config = Gemma3TextConfig(vocab_size=len(tokenizer), hidden_size=512, intermediate_size=2048, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=1, head_dim=128, max_position_embeddings=512,
                              sliding_window=64, layer_types=["sliding_attention", "full_attention"],
                              pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                              eos_token_id=tokenizer.eos_token_id)
    model = tmp_path / "wide"
    Gemma3ForCausalLM(config).save_pretrained(model)
    tokenizer.save_pretrained(model)
    run = tmp_path / "run"
    result = train(make_recipe(tmp_path, model, "dpo"), run, "--set", "train.epochs=1",
                   "--set", "train.micro_batch_tokens=64")
    assert result.exit_code == 0, result.output
    before = validations(run)[0]
    assert before["val_reward_margin"] == 0.0 and before["val_reward_accuracy"] == 0.5  # every pair a tie
