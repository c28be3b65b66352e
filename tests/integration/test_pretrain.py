"""`shitate train` with stage pretrain on a tiny Gemma 3: loss on every token, perplexity before and after."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from conftest import SHARED_DATA, write_jsonl
from shitate.cli import app
from shitate.errors import DataError

runner = CliRunner()
# Utterances of the first dialogues of RealPersonaChat (../shared/data/real-persona-chat, CC BY-SA 4.0), or a
# fallback of our own where that folder is missing.
FALLBACK = ["こんにちは、今日は暑いですね。", "そうですね、外に出るのがつらいです。", "休みの日は何をしていますか？",
            "映画を見たり、散歩をしたりしています。", "いいですね、最近見た映画はありますか？"]


def utterance_texts(count: int) -> list[str]:
    path = SHARED_DATA / "real-persona-chat" / "dialogues-2000.jsonl"
    if not path.is_file():
        return [FALLBACK[i % len(FALLBACK)] for i in range(count)]
    texts = []
    with path.open(encoding="utf-8") as handle:
        for line in handle:
            dialogue = json.loads(line)
            texts += ["\n".join(u["text"] for u in dialogue["utterances"][i:i + 4]) for i in range(0, 12, 4)]
            if len(texts) >= count:
                return texts[:count]
    return texts


def make_pretrain_recipe(folder: Path, model: Path, extra: str = "") -> Path:
    texts = utterance_texts(40)
    write_jsonl(folder / "text.jsonl", [{"text": t} for t in texts[:32]])
    write_jsonl(folder / "held-out.jsonl", [{"text": t} for t in texts[32:]])
    recipe = folder / "pretrain.yaml"
    recipe.write_text(f"""
name: tiny-pretrain
model: {model}
stage: pretrain
data: {{train: text.jsonl, validation: held-out.jsonl}}
adapter: {{method: lora, r: 8, alpha: 16, dropout: 0.0}}
train: {{epochs: 3, batch_size: 4, learning_rate: 3.0e-2, precision: fp32, warmup_ratio: 0.0}}
pretrain: {{block_size: 64}}
{extra}""", encoding="utf-8")
    return recipe


def test_pretraining_lowers_held_out_perplexity_and_records_it(tmp_path, tiny_model):
    run = tmp_path / "run"
    result = runner.invoke(app, ["train", str(make_pretrain_recipe(tmp_path, tiny_model)), "--out", str(run)])
    assert result.exit_code == 0, result.output
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["stage"] == "pretrain" and manifest["perplexity"]["after"] < 0.5 * manifest["perplexity"]["before"]
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["step"] == 0 and "val_perplexity" in records[0]  # measured before the first step
    losses = [r["loss"] for r in records if "loss" in r]
    assert losses[-1] < losses[0] - 1.0
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
    assert "perplexity" in " ".join(result.output.split()).lower()
    generated = runner.invoke(app, ["generate", str(run), "こんにちは", "--max-new-tokens", "5"])
    assert generated.exit_code == 0 and generated.output.startswith("こんにちは")


def test_pretraining_reads_a_folder_of_text_files_in_any_japanese_encoding(tmp_path, tiny_model):
    docs = tmp_path / "docs"
    docs.mkdir()
    for i, text in enumerate(utterance_texts(12)):
        (docs / f"{i:02d}.txt").write_bytes(text.replace("〜", "").encode("cp932" if i % 2 else "utf-8", errors="ignore"))
    recipe = make_pretrain_recipe(tmp_path, tiny_model)
    result = runner.invoke(app, ["train", str(recipe), "--out", str(tmp_path / "run"), "--set", f"data.train={docs}",
                                 "--set", "train.max_steps=2"])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "run" / "manifest.json").read_text())["data"]["train"]["records"] == 12


def test_chat_data_given_to_pretrain_and_text_given_to_sft_are_one_paragraph_each(tmp_path, tiny_model):
    recipe = make_pretrain_recipe(tmp_path, tiny_model)
    write_jsonl(tmp_path / "chat.jsonl", [{"messages": [{"role": "user", "content": "やあ"},
                                                         {"role": "assistant", "content": "こんにちは"}]}])
    run = tmp_path / "run"
    assert runner.invoke(app, ["train", str(recipe), "--out", str(run), "--set", "train.max_steps=1"]).exit_code == 0
    before = (run / "adapter" / "adapter_model.safetensors").read_bytes()
    result = runner.invoke(app, ["train", str(recipe), "--out", str(run), "--force", "--set", "data.train=chat.jsonl"])
    assert isinstance(result.exception, DataError)
    assert "chat.jsonl:1: text: missing: this is a chat record" in str(result.exception)
    assert (run / "adapter" / "adapter_model.safetensors").read_bytes() == before  # nothing overwritten
    result = runner.invoke(app, ["train", str(recipe), "--out", str(tmp_path / "sft"), "--set", "stage=sft",
                                 "--set", "pretrain=null", "--set", f"data.train={tmp_path / 'text.jsonl'}"])
    assert isinstance(result.exception, DataError)
    assert 'stage: pretrain' in str(result.exception) and "text.jsonl:1: messages: missing" in str(result.exception)


def test_text_import_and_check_from_the_command_line(tmp_path, tiny_model):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "rules.md").write_bytes("# 就業規則\n第1条 この規則は社員に適用する。".encode("cp932"))
    (docs / "blank.txt").write_text("", encoding="utf-8")
    out = tmp_path / "text.jsonl"
    result = runner.invoke(app, ["data", "import", str(docs), "--out", str(out)])
    assert result.exit_code == 1 and "blank.txt: has no text" in str(result.exception) and not out.exists()
    result = runner.invoke(app, ["data", "import", str(docs), "--out", str(out), "--skip-bad"])
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    # The article line's number is the passage's heading, its sentence the text.
    assert records == [{"text": "第1条\nこの規則は社員に適用する。", "source": str(docs / "rules.md"),
                        "heading": "就業規則 > 第1条"}]
    result = runner.invoke(app, ["data", "check", str(docs), "--model", str(tiny_model)])
    output = " ".join(result.output.split())
    assert result.exit_code == 1 and "blank.txt: is empty" in output and "1 valid document," in output
    (docs / "blank.txt").unlink()
    assert runner.invoke(app, ["data", "check", str(out), "--model", str(tiny_model)]).exit_code == 0
