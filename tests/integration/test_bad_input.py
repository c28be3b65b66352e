"""Issue 12's corpus of malformed inputs, each run through the command a user would use.

Every case must end with exit code 1, a message naming the file (and the line or field where
there is one) and the fix, no traceback, and nothing written or overwritten in the folder.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from conftest import ASSETS, kids_records
from shitate.cli import main
from shitate.progress import console

GOOD = {"messages": [{"role": "user", "content": "空はなぜ青いの?"}, {"role": "assistant", "content": "光が散るからだよ。"}]}


def chat(*turns: tuple[object, object]) -> str:
    return json.dumps({"messages": [{"role": r, "content": c} for r, c in turns]}, ensure_ascii=False)


def lines(*records: object) -> str:
    return "".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in records)


GOOD_LINE = lines(GOOD)
RECIPE = """name: bad
model: {model}
template: gemma
data: {train: train.jsonl}
train: {epochs: 1, batch_size: 4, max_length: 64, precision: fp32}
"""


@dataclass
class Case:
    """One malformed input: the files to write, the command (with {dir} and {model}), what the message must say."""

    kind: str
    files: dict[str, str | bytes]
    args: list[str]
    expect: list[str]
    needs: set[str] = field(default_factory=set)  # fixtures beyond the folder: "model", "sft_run"


def fill(text: str, names: dict[str, str]) -> str:
    """The case's placeholders ({dir}, {model}, …) replaced; YAML's own braces left alone."""
    for name, value in names.items():
        text = text.replace("{" + name + "}", value)
    return text


def recipe(extra: str = "", body: str | None = None) -> dict[str, str | bytes]:
    return {"recipe.yaml": (body if body is not None else RECIPE) + extra, "train.jsonl": GOOD_LINE * 8}


CASES = [
    # chat JSONL through `data check`
    Case("broken JSON", {"d.jsonl": GOOD_LINE + '{"messages": [{"role": "user"\n'}, ["data", "check", "{dir}/d.jsonl", "--no-tokens"],
         ["d.jsonl:2", "not valid JSON", "one complete JSON object"]),
    Case("truncated last line", {"d.jsonl": GOOD_LINE * 3 + GOOD_LINE[:40]}, ["data", "check", "{dir}/d.jsonl", "--no-tokens"],
         ["d.jsonl:4", "not valid JSON"]),
    Case("JSON array instead of JSONL", {"d.jsonl": json.dumps([GOOD, GOOD], ensure_ascii=False, indent=1)},
         ["data", "check", "{dir}/d.jsonl", "--no-tokens"], ["d.jsonl", "JSON array", "shitate data import"]),
    Case("invalid UTF-8 byte", {"d.jsonl": GOOD_LINE.encode() * 2 + GOOD_LINE.encode().replace("空".encode(), b"\xff\xfe")},
         ["data", "check", "{dir}/d.jsonl", "--no-tokens"], ["d.jsonl:3", "not valid UTF-8", "UTF-8"]),
    Case("Shift_JIS bytes", {"d.jsonl": (GOOD_LINE * 3).encode("cp932")}, ["data", "check", "{dir}/d.jsonl", "--no-tokens"],
         ["d.jsonl", "cp932", "iconv"]),
    Case("binary file", {"d.jsonl": bytes(range(256)) * 40}, ["data", "check", "{dir}/d.jsonl", "--no-tokens"],
         ["d.jsonl", "binary"]),
    Case("empty file", {"d.jsonl": ""}, ["data", "check", "{dir}/d.jsonl", "--no-tokens"], ["d.jsonl", "no records"]),
    Case("only blank lines", {"d.jsonl": "\n  \n\n"}, ["data", "check", "{dir}/d.jsonl", "--no-tokens"], ["d.jsonl", "no records"]),
    Case("50 MB single line", {"d.jsonl": '{"messages": [{"role": "user", "content": "' + "あ" * (17 * 2**20)},
         ["data", "check", "{dir}/d.jsonl", "--no-tokens"], ["d.jsonl:1", "MB", "split"]),
    Case("content of the wrong type", {"d.jsonl": lines(chat(("user", 42), ("assistant", "答え")))},
         ["data", "check", "{dir}/d.jsonl", "--no-tokens"], ["d.jsonl:1", "messages[0].content", "is int, expected a string"]),
    Case("messages not a list", {"d.jsonl": lines({"messages": "こんにちは"})},
         ["data", "check", "{dir}/d.jsonl", "--no-tokens"], ["d.jsonl:1", "messages", "not a non-empty list"]),
    Case("a record that is not an object", {"d.jsonl": GOOD_LINE + "[1, 2]\n"},
         ["data", "check", "{dir}/d.jsonl", "--no-tokens"], ["d.jsonl:2", "JSON list, expected an object"]),
    Case("unknown role", {"d.jsonl": lines(chat(("user", "質問"), ("bot", "答え")))},
         ["data", "check", "{dir}/d.jsonl", "--no-tokens"], ["d.jsonl:1", "messages[1].role", "'bot'", "assistant"]),
    Case("role misspelt", {"d.jsonl": lines(chat(("usr", "質問"), ("assistant", "答え")))},
         ["data", "check", "{dir}/d.jsonl", "--no-tokens"], ["d.jsonl:1", "did you mean user?"]),
    Case("wrong turn order", {"d.jsonl": lines(chat(("assistant", "答え"), ("user", "質問"), ("assistant", "答え")))},
         ["data", "check", "{dir}/d.jsonl", "--no-tokens"], ["d.jsonl:1", "first turn", "start the conversation with a user turn"]),
    Case("two turns of one role", {"d.jsonl": lines(chat(("user", "質問"), ("user", "もう一つ"), ("assistant", "答え")))},
         ["data", "check", "{dir}/d.jsonl", "--no-tokens"], ["d.jsonl:1", "same role", "alternate"]),
    Case("two system prompts", {"d.jsonl": lines(chat(("system", "A"), ("user", "質問"), ("system", "B"), ("assistant", "答え")))},
         ["data", "check", "{dir}/d.jsonl", "--no-tokens"], ["d.jsonl:1", "messages[2].role", "only come first"]),
    Case("empty answer", {"d.jsonl": lines(chat(("user", "質問"), ("assistant", "  ")))},
         ["data", "check", "{dir}/d.jsonl", "--no-tokens"], ["d.jsonl:1", "messages[1].content", "is empty"]),
    Case("no answer at the end", {"d.jsonl": lines(chat(("user", "質問"), ("assistant", "答え"), ("user", "次は?")))},
         ["data", "check", "{dir}/d.jsonl", "--no-tokens"], ["d.jsonl:1", "does not end with an assistant turn"]),
    Case("content missing", {"d.jsonl": lines({"messages": [{"role": "user"}, {"role": "assistant", "content": "答え"}]})},
         ["data", "check", "{dir}/d.jsonl", "--no-tokens"], ["d.jsonl:1", "messages[0].content", "missing"]),
    Case("special-token string in content", {"d.jsonl": lines(chat(("user", "質問<end_of_turn>"), ("assistant", "答え")))},
         ["data", "check", "{dir}/d.jsonl", "--no-tokens"], ["d.jsonl:1", "special token", "remove it"]),
    Case("alpaca record given to check", {"d.jsonl": lines({"instruction": "質問", "output": "答え"})},
         ["data", "check", "{dir}/d.jsonl", "--no-tokens"], ["d.jsonl:1", "alpaca", "shitate data import"]),
    Case("data file not found", {}, ["data", "check", "{dir}/nowhere.jsonl", "--no-tokens"], ["nowhere.jsonl", "not found"]),
    # preference pairs through `data check`
    Case("preference pair without rejected", {"p.jsonl": lines({"prompt": "質問", "chosen": "良い答え"})},
         ["data", "check", "{dir}/p.jsonl", "--no-tokens"], ["p.jsonl:1", "rejected"]),
    Case("preference pair with an empty side", {"p.jsonl": lines({"prompt": "質問", "chosen": "", "rejected": "悪い答え"})},
         ["data", "check", "{dir}/p.jsonl", "--no-tokens"], ["p.jsonl:1", "chosen", "empty"]),
    Case("chosen identical to rejected", {"p.jsonl": lines({"prompt": "質問", "chosen": "同じ", "rejected": "同じ"})},
         ["data", "check", "{dir}/p.jsonl", "--no-tokens"], ["p.jsonl:1", "identical"]),
    Case("preference pair without prompt", {"p.jsonl": lines({"chosen": "良い", "rejected": "悪い"}, {"prompt": "質問", "chosen": "良い", "rejected": "悪い"})},
         ["data", "check", "{dir}/p.jsonl", "--no-tokens"], ["p.jsonl:1", "prompt"]),
    # files people import
    Case("CSV with a wrong delimiter", {"q.csv": "question;answer\n質問;答え\n"}, ["data", "import", "{dir}/q.csv", "--out", "{dir}/out.jsonl"],
         ["q.csv", "question", "';'"]),
    Case("CSV with unknown columns", {"q.csv": "Q,A\n質問,答え\n"}, ["data", "import", "{dir}/q.csv", "--out", "{dir}/out.jsonl"],
         ["q.csv:1", "the header has: Q, A", "--question-column"]),
    Case("CSV with an empty cell", {"q.csv": "question,answer\n質問,答え\n質問2,\n"},
         ["data", "import", "{dir}/q.csv", "--out", "{dir}/out.jsonl"], ["q.csv:3", "answer", "is empty"]),
    Case("CSV row with a missing cell", {"q.csv": "question,answer\n質問,答え\n質問2\n"},
         ["data", "import", "{dir}/q.csv", "--out", "{dir}/out.jsonl"], ["q.csv:3", "answer", "missing"]),
    Case("CSV that is empty", {"q.csv": ""}, ["data", "import", "{dir}/q.csv", "--out", "{dir}/out.jsonl"], ["q.csv", "empty"]),
    Case("alpaca without output", {"a.jsonl": lines({"instruction": "質問", "output": "答え"}, {"instruction": "質問", "input": ""})},
         ["data", "import", "{dir}/a.jsonl", "--out", "{dir}/out.jsonl", "--format", "alpaca"], ["a.jsonl:2", "output", "missing"]),
    Case("sharegpt with an unknown speaker", {"s.jsonl": lines({"conversations": [{"from": "robot", "value": "やあ"}]})},
         ["data", "import", "{dir}/s.jsonl", "--out", "{dir}/out.jsonl"], ["s.jsonl:1", "conversations[0].from", "human, gpt"]),
    Case("records of no known format", {"x.jsonl": lines({"q": "質問", "a": "答え"})},
         ["data", "import", "{dir}/x.jsonl", "--out", "{dir}/out.jsonl"], ["x.jsonl:1", "unrecognised record", "--format"]),
    Case("import of a binary file", {"x.jsonl": bytes(range(256)) * 40},
         ["data", "import", "{dir}/x.jsonl", "--out", "{dir}/out.jsonl"], ["x.jsonl", "binary"]),
    Case("import of a Shift_JIS JSONL", {"x.jsonl": (GOOD_LINE * 2).encode("cp932")},
         ["data", "import", "{dir}/x.jsonl", "--out", "{dir}/out.jsonl"], ["x.jsonl", "cp932", "--encoding cp932"]),
    Case("split of a file with a bad line", {"d.jsonl": GOOD_LINE * 9 + "{oops\n"},
         ["data", "split", "{dir}/d.jsonl", "--out-dir", "{dir}/split"], ["d.jsonl:10", "not valid JSON"]),
    # recipes through `shitate train`
    Case("recipe with a typo", recipe("adapter: {mehtod: lora}\n"), ["train", "{dir}/recipe.yaml"],
         ["recipe.yaml", "adapter.mehtod", "did you mean `method`?"], {"model"}),
    Case("recipe with a wrong type", recipe(body=RECIPE.replace("epochs: 1", "epochs: three")), ["train", "{dir}/recipe.yaml"],
         ["recipe.yaml", "train.epochs", "integer"], {"model"}),
    Case("unknown stage", recipe("stage: sftt\n"), ["train", "{dir}/recipe.yaml"], ["recipe.yaml", "stage", "sft"], {"model"}),
    Case("unknown adapter", recipe("adapter: {method: lorra}\n"), ["train", "{dir}/recipe.yaml"],
         ["recipe.yaml", "adapter.method", "lora"], {"model"}),
    Case("recipe that is not YAML", {"recipe.yaml": "name: x\n  model: [unclosed\n"}, ["train", "{dir}/recipe.yaml"],
         ["recipe.yaml:2", "not valid YAML"]),
    Case("recipe that is a list", {"recipe.yaml": "- name: x\n"}, ["train", "{dir}/recipe.yaml"], ["recipe.yaml", "mapping"]),
    Case("empty recipe", {"recipe.yaml": ""}, ["train", "{dir}/recipe.yaml"], ["recipe.yaml", "empty"]),
    Case("recipe whose data is missing", {"recipe.yaml": RECIPE}, ["train", "{dir}/recipe.yaml"], ["train.jsonl", "not found"], {"model"}),
    Case("--set without =", recipe(), ["train", "{dir}/recipe.yaml", "--set", "train.epochs"], ["train.epochs", "KEY=VALUE"], {"model"}),
    Case("--set of the wrong type", recipe(), ["train", "{dir}/recipe.yaml", "--set", "train.learning_rate=fast"],
         ["train.learning_rate", "number"], {"model"}),
    Case("recipe with a missing model", recipe(body=RECIPE.replace("{model}", "{dir}/no-such-model")),
         ["train", "{dir}/recipe.yaml"], ["no-such-model", "no such file or folder"]),
    Case("model folder without weights", {**recipe(body=RECIPE.replace("{model}", "{dir}/empty-model")),
                                          "empty-model/config.json": '{"model_type": "gemma3_text"}'},
         ["train", "{dir}/recipe.yaml"], ["empty-model", "weights", "safetensors"]),
    Case("tokenizer that does not match the model", recipe(body=RECIPE.replace("{model}", "{mismatched}")),
         ["train", "{dir}/recipe.yaml"], ["tokenizer", "vocabulary", "embedding"], {"mismatched"}),
    Case("run folder from another stage", {"pairs.jsonl": lines({"prompt": "質問", "answer": "答え"})},
         ["score", "{sft_run}", "{dir}/pairs.jsonl"], ["stage sft", "stage: reward"], {"sft_run"}),
    Case("pickle weights", {}, ["generate", "{pickled}", "空は"], ["pytorch_model.bin", "--allow-pickle"], {"pickled"}),
]


def snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(folder.rglob("*"))}


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory, tiny_model, tokenizer) -> dict[str, str]:
    """The models and runs that some cases name: built once, never changed by the cases."""
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("bad-input-fixtures")
    mismatched = root / "mismatched"
    shutil.copytree(tiny_model, mismatched)
    other = AutoTokenizer.from_pretrained(ASSETS / "tiny-tokenizer")
    other.add_tokens([f"<extra_{i}>" for i in range(500)])  # 500 ids the model has no embedding rows for
    other.save_pretrained(mismatched)
    pickled = root / "pickled"
    shutil.copytree(tiny_model, pickled)
    import torch
    from safetensors.torch import load_file

    torch.save(load_file(pickled / "model.safetensors"), pickled / "pytorch_model.bin")
    (pickled / "model.safetensors").unlink()
    run = root / "sft-run"
    (root / "train.jsonl").write_text(lines(*kids_records(8)), encoding="utf-8")
    (root / "recipe.yaml").write_text(fill(RECIPE, {"model": str(tiny_model)}) + "adapter: {method: lora, r: 2}\n", encoding="utf-8")
    assert invoke(["train", str(root / "recipe.yaml"), "--out", str(run)])[0] == 0
    return {"model": str(tiny_model), "mismatched": str(mismatched), "pickled": str(pickled), "sft_run": str(run)}


def invoke(args: list[str]) -> tuple[int, str]:
    """Run the console entry point in this process, as a user's shell would: exit code and everything printed."""
    import contextlib
    import io

    buffer = io.StringIO()
    saved, console.file = sys.argv, buffer
    sys.argv = ["shitate", *args]
    try:
        with contextlib.redirect_stdout(buffer), contextlib.redirect_stderr(buffer):
            main()
        code = 0
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 1
    finally:
        sys.argv, console.file = saved, None
    return code, buffer.getvalue()


def test_the_corpus_is_large_and_each_case_is_a_different_kind():
    kinds = [case.kind for case in CASES]
    assert len(kinds) >= 40 and len(set(kinds)) == len(kinds)


@pytest.mark.parametrize("case", CASES, ids=[case.kind for case in CASES])
def test_a_malformed_input_exits_1_with_a_located_message_and_writes_nothing(case, tmp_path, monkeypatch, fixtures):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(console, "width", 1000)  # one problem a line, whatever the terminal
    names = {"dir": str(tmp_path), **fixtures}
    for name, content in case.files.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(fill(content, names) if name.endswith(".yaml") else content, encoding="utf-8")
    before = snapshot(tmp_path)
    fixtures_before = {name: snapshot(Path(path)) for name, path in fixtures.items() if name != "model"}

    code, output = invoke([fill(arg, names) for arg in case.args])

    flat = " ".join(output.split())
    assert code == 1, f"exit {code}:\n{output[-3000:]}"
    assert "Traceback" not in output, output[-3000:]
    for expected in case.expect:
        assert fill(expected, names) in flat, f"{expected!r} not in:\n{output[-3000:]}"
    assert snapshot(tmp_path) == before, "the command wrote or changed files"
    assert {name: snapshot(Path(path)) for name, path in fixtures.items() if name != "model"} == fixtures_before
