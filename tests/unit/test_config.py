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
    path = write_recipe(tmp_path, "name: x\nstage: dpo\ndata: {train: missing.jsonl}\ntrain: {epochs: 0, batchsize: 4}\n")
    with pytest.raises(ConfigError) as err:
        load_recipe(path)
    message = str(err.value)
    assert "3 problem(s)" in message
    assert "stage: 'dpo' is not available yet" in message
    assert "train.epochs" in message and "train.batchsize: unknown setting; did you mean `batch_size`?" in message


def test_missing_data_file_is_reported_before_any_model_loads(tmp_path):
    path = write_recipe(tmp_path, "name: x\ndata: {train: nowhere.jsonl}\n")
    with pytest.raises(ConfigError, match=r"data.train: file .*nowhere.jsonl does not exist"):
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


@pytest.mark.parametrize("recipe", sorted(REPO.glob("examples/*/recipe.yaml")), ids=lambda p: p.parent.name)
def test_every_example_recipe_parses(recipe):
    loaded = load_recipe(recipe, check_files=False)
    assert loaded.name == yaml.safe_load(recipe.read_text(encoding="utf-8"))["name"]
