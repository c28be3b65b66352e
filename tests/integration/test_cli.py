"""The command line as a user meets it: exit codes, one-paragraph errors, and the use verbs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_train import make_recipe
from typer.testing import CliRunner

from conftest import kids_records
from shitate.cli import app
from shitate.errors import ConfigError

runner = CliRunner()


def shitate(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "shitate.cli", *args], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=300)


def test_user_mistakes_exit_1_with_a_message_and_no_traceback(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    (tmp_path / "t.jsonl").write_text("", encoding="utf-8")
    recipe.write_text("name: x\nmodel: /nowhere/model\ndata: {train: t.jsonl}\ntrain: {lerning_rate: 1}\n", encoding="utf-8")
    cases = [
        (["train", str(recipe)], "did you mean `learning_rate`?"),
        (["data", "check", str(tmp_path / "missing.jsonl"), "--no-tokens"], "file not found"),
        (["generate", "/nowhere/model", "hi"], "/nowhere/model: no such file or folder"),
        (["data", "split", str(tmp_path / "t.jsonl"), "--out-dir", str(tmp_path), "--sizes", "1/1"], "three"),
    ]
    for args, expected in cases:
        result = shitate(*args)
        assert result.returncode == 1, (args, result.stderr)
        assert expected in " ".join(result.stderr.split()), (args, result.stderr)
        assert "Traceback" not in result.stderr


def test_data_check_lists_each_broken_line(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text('{"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]}\n'
                    '{"messages": [{"role": "user", "content": "Q"}\n'
                    '{"messages": [{"role": "usr", "content": "Q"}, {"role": "assistant", "content": "A"}]}\n',
                    encoding="utf-8")
    result = shitate("data", "check", str(path), "--no-tokens")
    assert result.returncode == 1
    assert f"{path}:2: not valid JSON" in result.stderr
    assert f"{path}:3: messages[0].role: is 'usr'; expected one of system, user, assistant (did you mean user?)" in result.stderr
    assert "1 valid conversation, 3 errors" in result.stderr


def test_import_then_split_from_a_csv(tmp_path):
    csv = tmp_path / "qa.csv"
    csv.write_text("question,answer\n" + "".join(f"Q{i},A{i}\n" for i in range(20)), encoding="utf-8")
    out = tmp_path / "all.jsonl"
    assert shitate("data", "import", str(csv), "--out", str(out), "--system", "S").returncode == 0
    assert shitate("data", "import", str(csv), "--out", str(out)).returncode == 1  # no silent overwrite
    result = shitate("data", "split", str(out), "--sizes", "10/5/5", "--out-dir", str(tmp_path / "split"))
    assert result.returncode == 0, result.stderr
    sizes = [len((tmp_path / "split" / f"{n}.jsonl").read_text().splitlines()) for n in ("train", "validation", "test")]
    assert sizes == [10, 5, 5]


def imported(source: Path) -> list[dict]:
    """`shitate data import SOURCE` into SOURCE's stem .jsonl beside it, read back."""
    out = source.with_suffix(".jsonl")
    result = shitate("data", "import", str(source), "--out", str(out))
    assert result.returncode == 0, result.stderr
    return [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]


def chat(question: str, answer: str) -> dict:
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}


@pytest.mark.parametrize("indent", [None, 2])
def test_a_json_array_file_imports_as_chats_or_pairs(tmp_path, indent):
    # alpaca_data.json and most ShareGPT dumps are one JSON array; json.dump without indent writes it on one line,
    # which read as one record ("unrecognised record (keys: list)"), and a preference array was refused outright.
    alpaca, pairs = tmp_path / "alpaca.json", tmp_path / "pairs.json"
    alpaca.write_text(json.dumps([{"instruction": f"Q{i}", "input": "", "output": f"A{i}"} for i in range(3)],
                                 indent=indent), encoding="utf-8")
    pairs.write_text(json.dumps([{"prompt": f"Q{i}", "chosen": "good", "rejected": "bad"} for i in range(2)],
                                indent=indent), encoding="utf-8")
    assert imported(alpaca) == [chat(f"Q{i}", f"A{i}") for i in range(3)]
    assert imported(pairs) == [{"prompt": f"Q{i}", "chosen": "good", "rejected": "bad"} for i in range(2)]
    checked = shitate("data", "check", str(alpaca), "--no-tokens")  # where JSON Lines belong, the fix is named
    assert checked.returncode == 1 and "is one JSON array" in checked.stderr and "shitate data import" in checked.stderr


def test_a_parquet_file_from_the_hub_imports_as_chats_or_pairs(tmp_path):
    # The Hugging Face hub stores data sets as Parquet: messages as lists of structs, alpaca columns, preference pairs.
    import pyarrow as pa
    import pyarrow.parquet as pq

    chats, alpaca, pairs, broken = (tmp_path / f"{name}.parquet" for name in ("chats", "alpaca", "pairs", "broken"))
    pq.write_table(pa.Table.from_pylist([{"messages": [{"role": "user", "content": f"Q{i}"},
                                                       {"role": "assistant", "content": f"A{i}"}]} for i in range(3)]),
                   chats)
    pq.write_table(pa.Table.from_pylist([{"instruction": "Q", "input": "", "output": "A"},
                                         {"instruction": "Q2", "input": "", "output": ""}]), alpaca)
    pq.write_table(pa.Table.from_pylist([{"prompt": "Q", "chosen": "good", "rejected": "bad"}]), pairs)
    broken.write_bytes(b"PAR1 not really")
    assert imported(chats) == [chat(f"Q{i}", f"A{i}") for i in range(3)]
    assert imported(pairs) == [{"prompt": "Q", "chosen": "good", "rejected": "bad"}]
    bad_row = shitate("data", "import", str(alpaca), "--out", str(tmp_path / "alpaca.jsonl"))  # rows count as lines
    assert bad_row.returncode == 1 and "alpaca.parquet:2: output: is empty" in " ".join(bad_row.stderr.split())
    unreadable = shitate("data", "import", str(broken), "--out", str(tmp_path / "broken.jsonl"))
    assert unreadable.returncode == 1 and "is not a Parquet file pyarrow can read" in " ".join(unreadable.stderr.split())
    assert "Traceback" not in unreadable.stderr and not (tmp_path / "broken.jsonl").exists()
    checked = shitate("data", "check", str(chats), "--no-tokens")  # where JSON Lines belong: the import is named
    assert checked.returncode == 1 and "is a Parquet file, not JSON Lines" in checked.stderr
    assert f"shitate data import {chats}" in " ".join(checked.stderr.split())


def test_an_excel_workbook_imports_with_excel_s_row_numbers(tmp_path):
    # What a Japanese team starts from: a sheet with 質問/回答 headers, a number for an answer, formatted empty rows
    # Excel keeps, an empty cell. It had to be saved as CSV first.
    import openpyxl

    book = openpyxl.Workbook()
    sheet = book.active
    sheet.append(["No.", "質問", "回答"])
    sheet.append([1, "なんで空は青いの?", "青い光が散らばるからだよ。"])
    sheet.append([None, None, None])  # a formatted empty row
    sheet.append([2, "1たす1は?", 2])
    sheet.append([3, "海はなぜしょっぱいの?", None])
    workbook = tmp_path / "qa.xlsx"
    book.save(workbook)
    out = tmp_path / "qa.jsonl"
    result = shitate("data", "import", str(workbook), "--out", str(out))
    assert result.returncode == 1 and "qa.xlsx:5: 回答: is empty" in " ".join(result.stderr.split())  # Excel's row 5
    result = shitate("data", "import", str(workbook), "--out", str(out), "--skip-bad")
    assert result.returncode == 0, result.stderr
    assert [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()] == [
        chat("なんで空は青いの?", "青い光が散らばるからだよ。"), chat("1たす1は?", "2")]
    checked = shitate("data", "check", str(workbook), "--no-tokens")  # where JSON Lines belong: the import is named
    assert checked.returncode == 1 and f"shitate data import {workbook}" in " ".join(checked.stderr.split())
    (tmp_path / "broken.xlsx").write_bytes(b"PK not a workbook")
    broken = shitate("data", "import", str(tmp_path / "broken.xlsx"), "--out", str(tmp_path / "b.jsonl"))
    assert broken.returncode == 1 and "is not an Excel workbook" in broken.stderr and "Traceback" not in broken.stderr


def test_compare_and_generate_on_a_trained_run(tmp_path, tiny_model):
    recipe = make_recipe(tmp_path, tiny_model)
    assert runner.invoke(app, ["train", str(recipe), "--out", str(tmp_path / "run")]).exit_code == 0
    out = tmp_path / "compare.jsonl"
    result = runner.invoke(app, ["compare", str(tiny_model), str(tmp_path / "run"), str(tmp_path / "test.jsonl"),
                                 "--out", str(out)])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert len(rows) == 8
    assert rows[0]["question"] == kids_records(40)[32]["messages"][0]["content"]
    assert rows[0]["reference"] == kids_records(40)[32]["messages"][1]["content"]
    assert set(rows[0]["rubric"]) == {"base", "tuned"} and "yo" in rows[0]["rubric"]["tuned"]
    result = runner.invoke(app, ["generate", str(tmp_path / "run"), "なんで", "--max-new-tokens", "5"])
    assert result.exit_code == 0 and result.stdout.startswith("なんで")


def test_chat_and_serve_with_a_run_use_the_system_prompt_it_trained_with(tmp_path, tiny_model, monkeypatch):
    import shitate.models.inference as inference
    from shitate.models.inference import with_system

    recipe = make_recipe(tmp_path, tiny_model)  # its data.system: 子ども向けに答えてね。
    assert runner.invoke(app, ["train", str(recipe), "--out", str(tmp_path / "run")]).exit_code == 0
    seen = []

    def recording(loaded, messages, spec):
        seen.append([dict(m) for m in messages])
        yield "はい"

    monkeypatch.setattr(inference, "stream_answer", recording)
    for extra in ([], ["--system", ""], ["--system", "ていねいに"]):
        result = runner.invoke(app, ["chat", str(tmp_path / "run"), *extra], input="なんで空は青いの?\n\n")
        assert result.exit_code == 0, result.output
    systems = [[m["content"] for m in messages if m["role"] == "system"] for messages in seen]
    assert systems == [["子ども向けに答えてね。"], [], ["ていねいに"]]
    assert "system prompt: 子ども向けに答えてね。" in runner.invoke(app, ["chat", str(tmp_path / "run")], input="\n").output
    # The server's prompts: the run's system prompt where a request has none, the request's own where it has one.
    from types import SimpleNamespace

    from shitate.serve.engine import Engine

    loaded = inference.load_for_inference(str(tmp_path / "run"))
    asked = [{"role": "user", "content": "a"}]
    own = [{"role": "system", "content": "T"}, *asked]
    engine = SimpleNamespace(loaded=loaded)  # chat_prompt reads only the loaded model: no batcher needed

    def tokens(messages):
        return loaded.tokenizer(loaded.template(messages, add_generation_prompt=True), add_special_tokens=False)["input_ids"]

    assert Engine.chat_prompt(engine, asked) == tokens([{"role": "system", "content": "子ども向けに答えてね。"}, *asked])
    assert Engine.chat_prompt(engine, own) == tokens(own)
    assert with_system(asked, None) == asked


def test_ctrl_c_in_chat_stops_the_answer_and_keeps_the_conversation(tiny_model, monkeypatch):
    import shitate.models.inference as inference

    real = inference.stream_answer

    def interrupted_once(loaded, messages, spec):  # Ctrl-C arrives while the first answer is being written
        stream = real(loaded, messages, spec)
        yield next(stream)
        if len(messages) == 1:
            raise KeyboardInterrupt
        yield from stream

    monkeypatch.setattr(inference, "stream_answer", interrupted_once)
    result = runner.invoke(app, ["chat", str(tiny_model), "--max-new-tokens", "6"], input="なんで空は青いの?\n夕焼けは?\n\n")
    assert result.exit_code == 0, result.output
    assert result.output.count("model> ") == 2 and "(stopped)" in result.output.split("model> ")[1]


def test_chat_streams_each_answer_and_keeps_the_conversation_until_an_empty_line(tmp_path, tiny_model):
    from shitate.config import GenerateSpec
    from shitate.models.inference import answer, load_for_inference

    result = runner.invoke(app, ["chat", str(tiny_model), "--max-new-tokens", "6"],
                           input="なんで空は青いの?\n夕焼けは?\n\nこれは読まれない\n")
    assert result.exit_code == 0, result.output
    replies = [part.split("\n")[0].strip() for part in result.output.split("model> ")[1:]]
    # What the model answers to the same turns without chat: the first alone, the second after the first exchange.
    loaded, spec = load_for_inference(str(tiny_model)), GenerateSpec(max_new_tokens=6, temperature=0.0)
    first = answer(loaded, [[{"role": "user", "content": "なんで空は青いの?"}]], spec)[0].strip()
    second = answer(loaded, [[{"role": "user", "content": "なんで空は青いの?"}, {"role": "assistant", "content": first},
                              {"role": "user", "content": "夕焼けは?"}]], spec)[0].strip()
    assert first and second and replies == [first, second]


def test_the_cli_warns_when_a_split_stays_empty(tmp_path):
    data = tmp_path / "two.jsonl"
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in kids_records(2)), encoding="utf-8")
    result = runner.invoke(app, ["data", "split", str(data), "--out-dir", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert "test got no records" in " ".join(result.output.split())


def tiny_gpt2(folder: Path, tokenizer, positions: int) -> Path:
    """A 2-layer GPT-2 whose table has `positions` learned positions."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("gpt2", vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=2,
                                  n_positions=positions, bos_token_id=tokenizer.bos_token_id,
                                  eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_generation_stops_where_learned_positions_end_and_refuses_a_prompt_past_them(tmp_path, tokenizer):
    # A GPT-2's table of positions has no row past n_positions: generating past it stopped with an IndexError
    # from inside torch, whatever the prompt.
    model = tiny_gpt2(tmp_path / "gpt2", tokenizer, positions=32)
    prompt = "なんで空は青いの?"
    prompt_tokens = len(tokenizer(tokenizer.bos_token + prompt, add_special_tokens=False)["input_ids"])
    result = runner.invoke(app, ["generate", str(model), prompt, "--max-new-tokens", "100"])
    assert result.exit_code == 0, result.output
    continued = result.output.strip()
    assert continued.startswith(prompt)
    new_tokens = len(tokenizer(continued[len(prompt):], add_special_tokens=False)["input_ids"])
    assert 0 < new_tokens <= 32 - prompt_tokens + 1  # decoding and encoding again may merge one token differently

    result = runner.invoke(app, ["generate", str(model), prompt * 6, "--max-new-tokens", "4"])
    assert isinstance(result.exception, ConfigError) and "learned positions for 32 tokens only" in str(result.exception)

    # In a chat the turn that no longer fits is refused and the chat goes on.
    result = runner.invoke(app, ["chat", str(model), "--template", "gemma", "--max-new-tokens", "4"],
                           input=f"{prompt * 6}\n{prompt}\n\n")
    output = " ".join(result.output.split())
    assert result.exit_code == 0, result.output
    assert "start a new conversation" in output and output.count("model> ") == 2
