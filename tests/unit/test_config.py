from pathlib import Path

import pytest
import yaml

from shitate.config import load_recipe, parse_overrides
from shitate.errors import ConfigError

REPO = Path(__file__).parents[2]


def write_recipe(tmp_path: Path, text: str) -> Path:
    (tmp_path / "train.jsonl").write_text('{"messages": []}\n', encoding="utf-8")
    path = tmp_path / "recipe.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def test_typo_is_named_with_a_suggestion(tmp_path):
    path = write_recipe(tmp_path, "name: x\ndata: {train: train.jsonl}\ntrain: {lerning_rate: 0.1}\n")
    with pytest.raises(ConfigError) as err:
        load_recipe(path)
    assert "train.lerning_rate: unknown setting; did you mean `learning_rate`?" in str(err.value)


def test_every_problem_is_listed_at_once(tmp_path):
    path = write_recipe(tmp_path, "name: x\nstage: rlhf\ndata: {train: missing.jsonl}\ntrain: {epochs: 0, batchsize: 4}\n")
    with pytest.raises(ConfigError) as err:
        load_recipe(path)
    message = str(err.value)
    assert "3 problem(s)" in message
    assert "stage: 'rlhf' is not available yet; this version trains stages sft, pretrain, reward, dpo, orpo, ppo, grpo" in message
    assert "train.epochs" in message and "train.batchsize: unknown setting; did you mean `batch_size`?" in message


def test_missing_data_file_is_reported_before_any_model_loads(tmp_path):
    path = write_recipe(tmp_path, "name: x\ndata: {train: nowhere.jsonl}\n")
    with pytest.raises(ConfigError, match=r"data.train: file .*nowhere.jsonl not found"):
        load_recipe(path)


def test_data_paths_are_relative_to_the_recipe(tmp_path):
    recipe = load_recipe(write_recipe(tmp_path, "name: x\ndata: {train: train.jsonl}\n"))
    assert recipe.data.train == (tmp_path / "train.jsonl").resolve()


def test_overrides_are_typed_and_validated(tmp_path):
    path = write_recipe(tmp_path, "name: x\ndata: {train: train.jsonl}\n")
    recipe = load_recipe(path, ["train.epochs=2", "adapter.method=full", "train.learning_rate=1e-3"])
    assert (recipe.train.epochs, recipe.adapter.method, recipe.train.learning_rate) == (2, "full", 1e-3)
    assert parse_overrides(["a.b=[1, 2]"]) == [("a.b", [1, 2])]
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        parse_overrides(["train.epochs"])
    with pytest.raises(ConfigError, match="adapter.method"):
        load_recipe(path, ["adapter.method=qlora2"])


def test_micro_batch_tokens_takes_a_number_auto_or_null(tmp_path):
    path = write_recipe(tmp_path, "name: x\ndata: {train: train.jsonl}\n")
    assert load_recipe(path).train.micro_batch_tokens == "auto"
    assert load_recipe(path, ["train.micro_batch_tokens=300"]).train.micro_batch_tokens == 300
    assert load_recipe(path, ["train.micro_batch_tokens=null"]).train.micro_batch_tokens is None
    with pytest.raises(ConfigError) as err:
        load_recipe(path, ["train.micro_batch_tokens=4"])
    assert "train.micro_batch_tokens: use a number of tokens (at least 8), auto, or null (got 4)" in str(err.value)


def test_broken_yaml_names_the_line(tmp_path):
    path = write_recipe(tmp_path, "name: x\ndata:\n  train: [unclosed\n")
    with pytest.raises(ConfigError, match=r"recipe.yaml:\d+: not valid YAML"):
        load_recipe(path)


@pytest.mark.parametrize("recipe", sorted(REPO.glob("examples/*/*.yaml")), ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_example_recipe_parses(recipe):
    loaded = load_recipe(recipe, check_files=False)
    assert loaded.name == yaml.safe_load(recipe.read_text(encoding="utf-8"))["name"]


def test_a_stage_section_takes_only_its_own_settings(tmp_path):
    path = write_recipe(tmp_path, "name: x\nstage: pretrain\ndata: {train: train.jsonl}\npretrain: {block_size: 128}\n")
    assert load_recipe(path).pretrain.block_size == 128
    with pytest.raises(ConfigError) as err:
        load_recipe(path, ["pretrain.blok_size=64", "train.packing=true", "sft.packing=false"])
    message = str(err.value)
    assert "pretrain.blok_size: unknown setting; did you mean `block_size`?" in message
    assert "train.packing: unknown setting here; packing belongs to stage sft (sft.packing)" in message
    assert "sft: settings for stage sft, but this recipe's stage is pretrain" in message


def test_a_setting_of_another_stage_is_named_with_its_home(tmp_path):
    path = write_recipe(tmp_path, "name: x\ndata: {train: train.jsonl}\nsft: {block_size: 64}\n")
    with pytest.raises(ConfigError, match=r"sft.block_size: unknown setting here; block_size belongs to stage pretrain"):
        load_recipe(path)


def test_the_saved_recipe_holds_only_its_own_stage_section(tmp_path):
    from shitate.config import dump_recipe

    saved = yaml.safe_load(dump_recipe(load_recipe(write_recipe(tmp_path, "name: x\ndata: {train: train.jsonl}\n"))))
    assert "sft" in saved and "pretrain" not in saved and saved["sft"]["packing"] == "auto"


def test_mixed_training_sources_are_relative_to_the_recipe(tmp_path):
    (tmp_path / "general.jsonl").write_text('{"messages": []}\n', encoding="utf-8")
    path = write_recipe(tmp_path, "name: x\ndata:\n  train:\n    - {path: train.jsonl}\n"
                                  "    - {path: general.jsonl, weight: 0.5}\n    - {path: gone.jsonl, weight: 0}\n")
    with pytest.raises(ConfigError, match=r"data.train.2.weight: Input should be greater than 0 \(got 0\)"):
        load_recipe(path)
    with pytest.raises(ConfigError, match=r"data.train: file .*gone.jsonl not found"):
        load_recipe(path, ["data.train=[{path: train.jsonl}, {path: gone.jsonl, weight: 2}]"])
    recipe = load_recipe(path, ["data.train=[{path: train.jsonl}, {path: general.jsonl, weight: 0.5}]"])
    assert [(s.path, s.weight) for s in recipe.data.train_sources()] == [
        ((tmp_path / "train.jsonl").resolve(), 1.0), ((tmp_path / "general.jsonl").resolve(), 0.5)]


def test_adapter_methods_are_the_five_the_docs_name(tmp_path):
    path = write_recipe(tmp_path, "name: x\ndata: {train: train.jsonl}\n")
    for method in ("lora", "dora", "loraplus", "qlora", "full"):
        assert load_recipe(path, [f"adapter.method={method}"]).adapter.method == method
    assert load_recipe(path, ["adapter.method=loraplus", "adapter.loraplus_ratio=8"]).adapter.loraplus_ratio == 8


def test_preference_and_rl_settings_live_in_their_stage_sections(tmp_path):
    path = write_recipe(tmp_path, "name: x\nstage: dpo\ndata: {train: train.jsonl}\ndpo: {beta: 0.2, loss: ipo}\n")
    recipe = load_recipe(path)
    assert (recipe.dpo.beta, recipe.dpo.loss) == (0.2, "ipo")
    with pytest.raises(ConfigError) as err:
        load_recipe(path, ["train.beta=0.3", "orpo.odds_ratio_weight=0.1"])
    message = str(err.value)
    assert "train.beta: unknown setting here; beta belongs to stage dpo (dpo.beta)" in message
    assert "orpo: settings for stage orpo, but this recipe's stage is dpo" in message
    with pytest.raises(ConfigError, match="samples_per_prompt"):
        load_recipe(path, ["stage=grpo", "dpo=null", "grpo.samples_per_prompt=1"])
