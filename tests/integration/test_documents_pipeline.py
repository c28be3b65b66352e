"""Documents → passages → QA pairs → estimate → a context-grounded SFT run, on the tiny model, from the CLI."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from shitate.cli import app
from shitate.data.tokens import Price, Usage, estimate

runner = CliRunner()
RULES = """# 出張旅費規程

## 第1章 総則

### 第1条 目的

1. この規程は、社員が業務のため出張する場合の旅費に関する事項を定める。

### 第2条 旅費の種類

1. 旅費は、交通費、宿泊料及び日当とする。

## 第2章 精算

### 第3条 精算の期限

1. 社員は、出張から帰った日から2週間以内に旅費を精算しなければならない。

### 第4条 宿泊料

1. 宿泊料は、1泊につき12,000円を上限として実費を支給する。
"""


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_documents_become_grounded_questions_and_a_tuned_run(tmp_path, tiny_model, monkeypatch):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "travel.md").write_text(RULES, encoding="utf-8")
    (docs / "travel-sjis.txt").write_bytes(RULES.replace("出張旅費規程", "出張規程").encode("cp932"))
    passages = tmp_path / "passages.jsonl"
    assert runner.invoke(app, ["data", "import", str(docs), "--out", str(passages)]).exit_code == 0
    records = lines(passages)
    assert len(records) == 8 and {r["heading"].split(" > ")[0] for r in records} == {"出張旅費規程", "出張規程"}

    qa = tmp_path / "qa.jsonl"
    result = runner.invoke(app, ["data", "synth", str(passages), "--out", str(qa)])
    assert result.exit_code == 0, result.output
    pairs = lines(qa)
    assert len(pairs) == 16 and all(p["context"] in {r["text"] for r in records} for p in pairs)
    deadline = next(p for p in pairs if p["messages"][0]["content"] == "出張旅費規程の第3条（精算の期限）には何が定められていますか。")
    assert "2週間以内に旅費を精算しなければならない" in deadline["messages"][1]["content"]
    assert "8 passages → 16 pairs generated → 16 kept" in " ".join(result.output.split())

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"""
name: rules
model: {tiny_model}
template: gemma
data: {{train: qa.jsonl}}
adapter: {{method: lora, r: 8, alpha: 16}}
train: {{epochs: 5, batch_size: 4, learning_rate: 3.0e-2, max_length: 256, precision: fp32, warmup_ratio: 0.0}}
""", encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    existing = tmp_path / "runs" / "rules"  # a run where the recipe's runs/<name> points: the estimate leaves it alone
    existing.mkdir(parents=True)
    (existing / "keep.txt").write_text("a real run", encoding="utf-8")
    result = runner.invoke(app, ["data", "estimate", str(qa), "--recipe", str(recipe), "--requests", "1000"])
    assert result.exit_code == 0, result.output
    output = " ".join(result.output.split())
    assert "16 examples" in output and "× 5 epochs" in output and "tokens/s measured" in output
    assert "openai gpt-4.1-mini" in output and "break-even" in output
    assert (existing / "keep.txt").read_text(encoding="utf-8") == "a real run"

    result = runner.invoke(app, ["train", str(recipe), "--out", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    losses = [json.loads(line)["loss"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
              if "loss" in json.loads(line)]
    assert losses[-1] < losses[0] / 2  # the answers quote the passage in the prompt: copying is learned


def test_model_mode_with_a_generator_that_writes_nothing_useful_says_so(tmp_path, tiny_model):
    passages = tmp_path / "passages.jsonl"
    passages.write_text(json.dumps({"text": "第1条 目的\n旅費に関する事項を定める。", "heading": "規程 > 第1条 目的"},
                                   ensure_ascii=False) + "\n", encoding="utf-8")
    result = runner.invoke(app, ["data", "synth", str(passages), "--out", str(tmp_path / "qa.jsonl"), "--mode", "model",
                                 "--generator", str(tiny_model)])
    assert result.exit_code == 1
    assert "no question/answer pair passed the filters" in str(result.exception)
    assert not (tmp_path / "qa.jsonl").exists()


def test_break_even_against_few_shot_by_hand():
    usage = Usage(examples=100, tokens_per_epoch=20_000, epochs=3, prompt_tokens=100, answer_tokens=50, shots=4)
    price = Price(training=10.0, input=1.0, output=2.0, tuned_input=2.0, tuned_output=4.0)
    (result,) = estimate(usage, {"s": price})
    assert result.training_cost == 60_000 * 10.0 / 1e6                      # 0.6 USD
    assert result.tuned_per_request == (100 * 2.0 + 50 * 4.0) / 1e6          # 400e-6
    assert result.few_shot_per_request == ((100 + 600) * 1.0 + 50 * 2.0) / 1e6  # 800e-6
    assert abs(result.break_even_requests - 0.6 / 400e-6) < 1e-6             # 1,500 requests
    cheap = estimate(Usage(1, 10, 1, 100, 50, 0), {"s": price})[0]
    assert cheap.break_even_requests is None  # without examples to save, tuning never pays for itself
