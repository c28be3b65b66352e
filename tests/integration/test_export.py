"""`shitate export`: a tiny run merged into a plain model folder that renders and answers like the run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_train import make_recipe, train
from typer.testing import CliRunner

from shitate.cli import app

runner = CliRunner()


@pytest.fixture(scope="module")
def tuned_run(tmp_path_factory, tiny_model):
    folder = tmp_path_factory.mktemp("export-run")
    run = folder / "run"
    # The recipe's four epochs: after two, the adapter moved the tiny model too little to change a greedy answer, and
    # the broken-merge test below needs a run whose answers differ from its base's.
    assert train(make_recipe(folder, tiny_model), run).exit_code == 0
    return run


def test_export_writes_a_model_that_renders_and_answers_like_the_run(tuned_run, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from shitate.data.templates import get_template

    out = tmp_path / "merged"
    result = runner.invoke(app, ["export", str(tuned_run), "--out", str(out), "--dtype", "fp32"])
    assert result.exit_code == 0, result.output
    assert "parity merged safetensors: 100.0% of the run's decided" in " ".join(result.output.split())
    tokenizer = AutoTokenizer.from_pretrained(out)
    messages = [{"role": "system", "content": "子ども向けに答えてね。"}, {"role": "user", "content": "なんで空は青いの?"}]
    # transformers (and vLLM, TGI) render the prompt exactly as training did, from tokenizer_config.json alone.
    assert tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == \
        get_template("gemma", tokenizer)(messages, add_generation_prompt=True)
    assert json.loads((out / "tokenizer_config.json").read_text())["chat_template"] == tokenizer.chat_template
    end_of_turn = tokenizer.convert_tokens_to_ids("<end_of_turn>")
    assert end_of_turn in json.loads((out / "generation_config.json").read_text())["eos_token_id"]
    model = AutoModelForCausalLM.from_pretrained(out)
    assert not any("lora" in name for name, _ in model.named_parameters())  # merged: a plain model
    again = runner.invoke(app, ["export", str(tuned_run), "--out", str(out)])
    assert again.exit_code == 1 and "--force" in str(again.exception)


def test_an_export_that_lost_the_adapter_fails_the_parity_check(tuned_run, tmp_path, monkeypatch):
    from shitate.export.merge import ParityFailed
    from shitate.models import load

    original = load.load_model
    # A broken merge: the base without the adapter's change (the run itself still loads with its adapter).
    monkeypatch.setattr(load, "load_model", lambda source, **kw: original(
        type(source)(source.kind, source.reference, source.folder), **{**kw, "merge_adapter": False}))
    result = runner.invoke(app, ["export", str(tuned_run), "--out", str(tmp_path / "broken")])
    assert isinstance(result.exception, ParityFailed)
    assert "does not answer like" in str(result.exception) and "Do not ship it" in str(result.exception)


def test_gguf_of_a_base_that_was_not_a_gguf_says_how_to_convert(tuned_run, tmp_path):
    result = runner.invoke(app, ["export", str(tuned_run), "--out", str(tmp_path / "g"), "--gguf", "q8_0", "--no-check"])
    assert result.exit_code == 1
    assert "convert_hf_to_gguf.py" in str(result.exception)
    result = runner.invoke(app, ["export", str(tuned_run), "--out", str(tmp_path / "h"), "--gguf", "q4_k_m"])
    assert "offered types are f16, bf16, q8_0" in str(result.exception)


@pytest.mark.slow
def test_the_default_model_exports_to_gguf_that_answers_like_the_run(tmp_path):
    """Needs the 270M weights: a 2-step run of the kids_qa recipe, exported as q8_0 and f16 GGUF."""
    from conftest import REPO

    run = tmp_path / "run"
    assert runner.invoke(app, ["train", str(REPO / "examples/kids_qa/recipe.yaml"), "--out", str(run), "--set",
                               "train.max_steps=2"]).exit_code == 0
    result = runner.invoke(app, ["export", str(run), "--gguf", "q8_0", "--gguf", "f16"])
    assert result.exit_code == 0, result.output
    assert (run / "export" / "model-q8_0.gguf").is_file() and (run / "export" / "Modelfile").is_file()


@pytest.mark.skipif(__import__("importlib.util").util.find_spec("bitsandbytes") is None,
                    reason="QLoRA needs bitsandbytes (the dev extra installs it)")
def test_a_qlora_run_is_merged_into_an_unquantised_base(tmp_path, tiny_model):
    from transformers import AutoModelForCausalLM

    run = tmp_path / "run"
    assert train(make_recipe(tmp_path, tiny_model), run, "--set", "adapter.method=qlora", "--set",
                 "train.precision=bf16").exit_code == 0
    result = runner.invoke(app, ["export", str(run), "--out", str(tmp_path / "merged"), "--dtype", "fp32"])
    assert result.exit_code == 0, result.output
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert not any("4bit" in type(m).__name__ for m in model.modules())
    assert all(p.dtype == __import__("torch").float32 for p in model.parameters())


def test_a_run_on_another_family_s_gguf_exports_a_gguf_that_reads_back_as_the_merged_model(tmp_path, monkeypatch,
                                                                                            tiny_gguf, tokenizer):
    # llama.cpp keeps a Llama's query and key rows permuted; written in transformers' order, every head's rotary
    # position was scrambled in the file (at the first position rotation is the identity, so early tokens agreed).
    # A GPT-2's export stopped with a KeyError (its config says n_layer) before its transposed layers were written.
    import torch
    from transformers import AutoModelForCausalLM

    monkeypatch.setenv("SHITATE_HOME", str(tmp_path / "home"))
    run = tmp_path / "run"
    assert train(make_recipe(tmp_path, tiny_gguf[1]), run).exit_code == 0
    out = tmp_path / "export"
    result = runner.invoke(app, ["export", str(run), "--out", str(out), "--dtype", "fp32", "--gguf", "f16"])
    assert result.exit_code == 0, result.output

    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    from_gguf = AutoModelForCausalLM.from_pretrained(out, gguf_file="model-f16.gguf", dtype=torch.float32)
    ids = torch.tensor([tokenizer.encode("なんで夕焼けは赤いの? 空が青いのはなぜ?", add_special_tokens=False)])
    assert ids.shape[1] >= 16
    with torch.inference_mode():
        expected, got = merged(ids).logits, from_gguf(ids).logits
    assert (got - expected).abs().max() < 0.01 * expected.abs().max()  # f16 rounding of the weights, nothing more


def test_a_run_with_no_decided_choice_is_judged_on_all_of_them(tuned_run, tmp_path, monkeypatch):
    # A barely trained toy model (a tiny GPT-2) leads by a logit nowhere: its exact fp32 export agreed at 100% of the
    # positions and was refused for agreeing at "0.0%" of none. A margin no choice reaches makes every run such a run.
    from shitate.export import merge

    monkeypatch.setattr(merge, "DECIDED_MARGIN", 1e9)
    result = runner.invoke(app, ["export", str(tuned_run), "--out", str(tmp_path / "merged"), "--dtype", "fp32"])
    assert result.exit_code == 0, result.output
    assert "100.0% of the run's next-token choices agree (none is decided" in " ".join(result.output.split())
    assert not merge.Parity("f", None, 0.9).passed and merge.Parity("f", 1.0, 0.9).passed


def _render_go_template(text: str, messages: list[dict]) -> str:
    """The subset of Go's text/template our Ollama templates use: range .Messages (with or without $i, $m :=),
    if/else if on eq .Role "…" or eq $i N, .Content."""
    import re

    out: list[str] = []
    tokens = re.split(r"(\{\{.*?\}\})", text)

    def holds(condition: str, message: dict, index: int) -> bool:
        role, position = re.search(r'eq \.Role "(\w+)"', condition), re.search(r"eq \$i (\d+)", condition)
        if role is not None:
            return role.group(1) == message["role"]
        if position is not None:
            return int(position.group(1)) == index
        assert condition in ("{{ else }}",), condition
        return True

    def run(items: list[str], message: dict, position: int) -> None:  # outside the range: no message, {}
        index = 0
        while index < len(items):
            item = items[index]
            if item in ("{{ range .Messages }}", "{{ range $i, $m := .Messages }}"):
                end = _matching_end(items, index)
                for i, each in enumerate(messages):
                    run(items[index + 1:end], each, i)
                index = end + 1
            elif item.startswith("{{ if "):
                end = _matching_end(items, index)
                branches, start, depth = [], index, 0
                for k in range(index + 1, end):
                    depth += items[k].startswith(("{{ if ", "{{ range ")) - (items[k] == "{{ end }}")
                    if depth == 0 and items[k].startswith("{{ else"):
                        branches.append((items[start], items[start + 1:k]))
                        start = k
                branches.append((items[start], items[start + 1:end]))
                for condition, body in branches:
                    if holds(condition, message, position):
                        run(body, message, position)
                        break
                index = end + 1
            elif item == "{{ .Content }}":
                out.append(message["content"])  # a KeyError outside the range
                index += 1
            else:
                assert not item.startswith("{{"), item
                out.append(item)
                index += 1

    run([t for t in tokens if t], {}, -1)
    return "".join(out)


def _matching_end(items: list[str], start: int) -> int:
    depth = 0
    for index in range(start, len(items)):
        depth += items[index].startswith(("{{ if ", "{{ range ")) - (items[index] == "{{ end }}")
        if depth == 0:
            return index
    raise AssertionError("unbalanced template")


def test_the_ollama_modelfile_of_a_plain_template_run_prompts_as_training_did(tmp_path, monkeypatch, tokenizer):
    # A base model whose tokenizer knows no turn markers trains on the plain template; its Modelfile had no TEMPLATE,
    # and Ollama fell back to whatever it made of the GGUF's Jinja.
    from conftest import MULTI_TURN
    from shitate.data.templates import get_template
    from tiny_families import build_tiny, write_gguf

    monkeypatch.setenv("SHITATE_HOME", str(tmp_path / "home"))
    folder = build_tiny("llama", tmp_path / "llama", tokenizer)
    gguf_file = write_gguf(folder, tmp_path / "tiny-llama.gguf")
    run = tmp_path / "run"
    assert train(make_recipe(tmp_path, gguf_file), run, "--set", "template=plain", "--set", "train.epochs=1").exit_code == 0
    result = runner.invoke(app, ["export", str(run), "--out", str(tmp_path / "export"), "--gguf", "f16", "--no-check"])
    assert result.exit_code == 0, result.output

    modelfile = (tmp_path / "export" / "Modelfile").read_text(encoding="utf-8")
    ollama = modelfile.split('TEMPLATE """', 1)[1].split('"""', 1)[0]
    template = get_template("plain", tokenizer)
    for messages in (MULTI_TURN, MULTI_TURN[1:], MULTI_TURN[:2]):
        assert _render_go_template(ollama, messages) == template(messages, add_generation_prompt=True)
    assert f'PARAMETER stop "{tokenizer.eos_token}"' in modelfile
    # Ollama answers as the run's recipe says (generate: max_new_tokens 12, greedy), not with its own defaults
    # (temperature 0.8, a repeat penalty of 1.1, no length limit); top-k is the model's (transformers' 50 here).
    parameters = [line for line in modelfile.splitlines() if line.startswith("PARAMETER") and "stop" not in line]
    assert parameters == ["PARAMETER temperature 0.0", "PARAMETER top_p 1.0", "PARAMETER top_k 50",
                          "PARAMETER repeat_penalty 1.0", "PARAMETER num_predict 12"]


TRIMMING_LLAMA3 = ("{{ bos_token }}{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n'"
                   " + m['content'] | trim + '<|eot_id|>' }}{% endfor %}{% if add_generation_prompt %}"
                   "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}")
NUMBERED = ("{% for m in messages %}Turn {{ loop.index }} {{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}Turn {{ messages | length + 1 }} assistant:{% endif %}")


@pytest.mark.parametrize("own", ["qwen3", "trimming", "numbered"])
def test_the_ollama_modelfile_of_a_model_s_own_template_prompts_as_training_did(tmp_path, tokenizer, own):
    # A model trained on its own chat template (template: auto; Qwen3, Llama 3 Instruct, …) had no TEMPLATE in its
    # Modelfile: Ollama does not run the GGUF's Jinja but guesses a template from it (none for an unfamiliar one, and
    # for Qwen3 without the empty thinking block training put before each answer).
    from conftest import MULTI_TURN
    from shitate.data.templates import get_template
    from shitate.export.gguf import _write_modelfile

    own_template = {"qwen3": (Path(__file__).parents[1] / "assets" / "qwen3_chat_template.jinja").read_text("utf-8"),
                    "trimming": TRIMMING_LLAMA3, "numbered": NUMBERED}[own]
    tokenizer = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    tokenizer.chat_template = own_template
    template = get_template("auto", tokenizer)
    _write_modelfile(tmp_path, tmp_path / "model-f16.gguf", template, "短く答えて")
    modelfile = (tmp_path / "Modelfile").read_text(encoding="utf-8")
    if own == "numbered":  # each turn's text depends on its number: no Ollama template says that, and it is said
        assert "TEMPLATE" not in modelfile.replace("# No TEMPLATE", "") and "# No TEMPLATE" in modelfile
        return
    ollama = modelfile.split('TEMPLATE """', 1)[1].split('"""', 1)[0]
    system = [{"role": "system", "content": "短く答えて"}]
    for messages in (MULTI_TURN[:4], MULTI_TURN[1:4], MULTI_TURN[:2], system + MULTI_TURN[1:4], MULTI_TURN[1:2]):
        assert _render_go_template(ollama, messages) == template(messages, add_generation_prompt=True)
    if own == "qwen3":
        assert _render_go_template(ollama, MULTI_TURN[1:2]).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert ("trims the whitespace" in modelfile) == (own == "trimming")
    assert 'SYSTEM """短く答えて"""' in modelfile and f'PARAMETER stop "{template.end_of_turn}"' in modelfile
