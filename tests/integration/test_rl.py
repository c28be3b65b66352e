"""Stages grpo and ppo end to end on a tiny Gemma 3: a checkable reward rises; bad recipes fail before loading."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from conftest import assert_same_adapter, crashed_copy, quantised_layer_types, write_jsonl
from shitate.cli import app
from shitate.errors import ConfigError

runner = CliRunner()
QUESTIONS = ["空はなぜ青いの?", "海はなぜしょっぱいの?", "雨はどこから来るの?", "虹はなぜできるの?", "夜はなぜ暗いの?",
             "風はなぜふくの?", "雪はなぜ白いの?", "月はなぜ光るの?"]


def make_recipe(folder: Path, model: Path | str, stage: str, extra: str = "",
                rubric: str = "- {name: yo, check: contains, values: [よ]}") -> Path:
    write_jsonl(folder / "prompts.jsonl", [{"prompt": q} for q in QUESTIONS])
    recipe = folder / f"{stage}.yaml"
    recipe.write_text(f"""
name: tiny-{stage}
model: {model}
template: gemma
stage: {stage}
data: {{train: prompts.jsonl, validation: prompts.jsonl}}
adapter: {{method: lora, r: 4, alpha: 8, dropout: 0.0}}
train: {{epochs: 6, batch_size: 4, learning_rate: 2.0e-2, max_length: 64, precision: fp32, warmup_ratio: 0.0, checkpoint_every: 4}}
{stage}: {{max_new_tokens: 12, samples_per_prompt: {4 if stage == "grpo" else 2}, kl_coef: 0.01}}
eval:
  rubric:
    {rubric}
{extra}""", encoding="utf-8")
    return recipe


def train(recipe: Path, out: Path, *args: str):
    return runner.invoke(app, ["train", str(recipe), "--out", str(out), *args])


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_grpo_raises_a_rubric_reward_and_resumes_exactly(tmp_path, tiny_model):
    recipe = make_recipe(tmp_path, tiny_model, "grpo")
    run = tmp_path / "run"
    result = train(recipe, run)
    assert result.exit_code == 0, result.output
    # The sampled answers' reward is what GRPO raises. The greedy validation answers of a 2-layer random model
    # are one token repeated, which passes or fails the rubric as a whole: on a GPU's random draws they ended
    # failing (0.125 → 0.0) while the sampled reward rose as on a CPU, so only their logging is checked.
    steps = [r for r in records(run) if "reward" in r]
    assert sum(r["reward"] for r in steps[-3:]) > sum(r["reward"] for r in steps[:3]) + 0.6
    validation = [r["val_reward"] for r in records(run) if "val_reward" in r]
    assert len(validation) == 2
    assert len(steps) == 12 and {"kl", "entropy", "policy_loss", "rollout_tokens_per_s", "samples"} <= steps[0].keys()
    assert json.loads((run / "manifest.json").read_text())["reward"]["after"] == validation[-1]
    crashed = crashed_copy(run, tmp_path / "crashed", last_checkpoint=8)
    assert train(recipe, crashed, "--resume").exit_code == 0
    assert_same_adapter(run, crashed)


def test_grpo_under_qlora_samples_and_trains_on_a_4_bit_base(tmp_path, tiny_model, monkeypatch):
    # The sampling stages loaded their base without the recipe's 4 bits: qlora trained plain LoRA, saying nothing.
    pytest.importorskip("bitsandbytes")
    quantised = quantised_layer_types(monkeypatch)
    run = tmp_path / "run"
    result = train(make_recipe(tmp_path, tiny_model, "grpo"), run, "--set", "adapter.method=qlora",
                   "--set", "train.max_steps=2")
    assert result.exit_code == 0, result.output
    assert quantised == {"Linear4bit"}
    assert len([r for r in records(run) if "reward" in r]) == 2


def test_ppo_from_a_tuned_run_raises_the_reward_with_a_value_head(tmp_path, tiny_model):
    start = tmp_path / "start"
    assert train(make_recipe(tmp_path, tiny_model, "grpo", "train: {epochs: 1, batch_size: 4, max_steps: 1, "
                             "precision: fp32}"), start).exit_code == 0
    run = tmp_path / "ppo"
    result = train(make_recipe(tmp_path, start, "ppo"), run)
    assert result.exit_code == 0, result.output
    steps = [r for r in records(run) if "reward" in r]
    assert all("value_loss" in r for r in steps)
    assert sum(r["reward"] for r in steps[-3:]) > sum(r["reward"] for r in steps[:3]) + 0.3
    # The tuned model loads as any run folder does: its adapter on the start run's merged weights.
    generated = runner.invoke(app, ["generate", str(run), "空は", "--max-new-tokens", "4"])
    assert generated.exit_code == 0, generated.output


def test_ppo_without_a_start_run_is_refused_before_loading(tmp_path, tiny_model):
    result = train(make_recipe(tmp_path, tiny_model, "ppo"), tmp_path / "run")
    assert isinstance(result.exception, ConfigError) and "not a finished run folder" in str(result.exception)
    assert not (tmp_path / "run").exists()


def test_a_recipe_without_any_reward_is_refused(tmp_path, tiny_model):
    recipe = make_recipe(tmp_path, tiny_model, "grpo", rubric="[]")
    result = train(recipe, tmp_path / "run")
    assert isinstance(result.exception, ConfigError) and "grpo: no reward" in str(result.exception)


def test_a_reward_model_with_another_tokenizer_is_refused(tmp_path, tiny_model, tokenizer):
    other = tmp_path / "other-base"
    shutil.copytree(tiny_model, other)
    changed = type(tokenizer).from_pretrained(tiny_model)
    changed.add_tokens(["<社内用語>"])
    changed.save_pretrained(other)
    base = AutoModelForCausalLM.from_pretrained(other)
    base.resize_token_embeddings(len(changed))  # a sound model of its own, with a row for the new word
    base.save_pretrained(other)
    reward_run = tmp_path / "reward-run"
    (reward_run / "adapter").mkdir(parents=True)
    (reward_run / "recipe.yaml").write_text(f"name: r\nmodel: {other}\nstage: reward\n", encoding="utf-8")
    recipe = make_recipe(tmp_path, tiny_model, "grpo", rubric="[]")
    recipe.write_text(recipe.read_text().replace("kl_coef: 0.01}", f"kl_coef: 0.01, reward_model: {reward_run}}}"))
    result = train(recipe, tmp_path / "run")
    assert isinstance(result.exception, ConfigError) and "another tokenizer" in str(result.exception)


@pytest.mark.parametrize("limit", [0.001])
def test_a_kl_past_the_limit_stops_training_with_the_reason(tmp_path, tiny_model, limit):
    recipe = make_recipe(tmp_path, tiny_model, "grpo")
    recipe.write_text(recipe.read_text().replace("kl_coef: 0.01}", f"kl_coef: 0.01, max_kl: {limit}}}"))
    result = train(recipe, tmp_path / "run")
    assert result.exit_code == 1 and "past grpo.max_kl" in str(result.exception)


def test_prompts_from_several_sources_are_mixed_by_weight(tmp_path, tiny_model):
    recipe = make_recipe(tmp_path, tiny_model, "grpo")
    write_jsonl(tmp_path / "more.jsonl", [{"prompt": f"追加の質問{i}は?"} for i in range(4)])
    mixed = "[{path: prompts.jsonl}, {path: more.jsonl, weight: 0.5}]"
    result = train(recipe, tmp_path / "run", "--set", f"data.train={mixed}", "--set", "train.max_steps=1")
    assert result.exit_code == 0, result.output
    assert f"{len(QUESTIONS) + 2} prompts" in " ".join(result.output.split())  # all of one, half of the other
