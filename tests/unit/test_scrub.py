"""Personal data: each kind found and masked consistently, check digits honoured, and measured on labelled files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from shitate.cli import app
from shitate.data.scrub import Scrubber, luhn_valid, measure, my_number_valid

ASSETS = Path(__file__).parents[1] / "assets"
runner = CliRunner()


def test_check_digits():
    assert my_number_valid("090054749952") and not my_number_valid("090054749953")
    assert not my_number_valid("111111111111")  # a repeated digit is a placeholder, not a number
    assert luhn_valid("4111111111111111") and not luhn_valid("4111111111111112")


def test_the_same_person_gets_the_same_mask_and_allowed_text_is_kept():
    scrubber = Scrubber(allow=frozenset({"03-1111-2222"}))
    first, found = scrubber.scrub("山田太郎さんの携帯は０９０－１２３４－５６７８、代表は03-1111-2222です。")
    assert first == "[NAME_1]さんの携帯は[PHONE_1]、代表は03-1111-2222です。"
    assert [f.kind for f in found] == ["NAME", "PHONE"]
    second, _ = scrubber.scrub("折り返しは090-1234-5678へ。山田太郎さんより。佐藤さんも同席。")
    assert second == "折り返しは[PHONE_1]へ。[NAME_1]さんより。[NAME_2]さんも同席。"


def test_numbers_that_are_not_personal_data_are_left_alone():
    text = "第12条に定める。価格は12,800円。2024-01-15に施行。番号 090054749953。カード 4111 1111 1111 1112。誠実に働く。"
    assert Scrubber().find(text) == []


@pytest.mark.parametrize("name, least", [("pii-labelled.txt", 0.95), ("pii-heldout.txt", 0.9)])
def test_precision_and_recall_on_labelled_files(name, least):
    scores = measure((ASSETS / name).read_text(encoding="utf-8").splitlines())
    assert scores["all"]["tp"] >= 25
    assert scores["all"]["precision"] >= least and scores["all"]["recall"] >= least, scores["all"]


def test_scrub_command_masks_a_jsonl_and_reports_lines(tmp_path):
    path = tmp_path / "chats.jsonl"
    records = [{"messages": [{"role": "user", "content": "鈴木花子です。メールは hanako@example.jp です。"},
                             {"role": "assistant", "content": "鈴木花子様、承知しました。"}]},
               {"messages": [{"role": "user", "content": "住所は東京都渋谷区渋谷2-21-1です。"}]}]
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    out = tmp_path / "masked.jsonl"
    dry = runner.invoke(app, ["data", "scrub", str(path), "--dry-run"])
    assert dry.exit_code == 0 and not out.exists()
    assert f"{path}:2: ADDRESS '東京都渋谷区渋谷2-21-1' → [ADDRESS_1]" in " ".join(dry.output.split())
    result = runner.invoke(app, ["data", "scrub", str(path), "--out", str(out)])
    assert result.exit_code == 0, result.output
    masked = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert masked[0]["messages"][0] == {"role": "user", "content": "[NAME_1]です。メールは [EMAIL_1] です。"}
    assert masked[0]["messages"][1]["content"] == "[NAME_1]様、承知しました。"
    assert masked[1]["messages"][0]["content"] == "住所は[ADDRESS_1]です。"

    path.write_text('{"messages": []}\n{"broken\n', encoding="utf-8")
    broken = runner.invoke(app, ["data", "scrub", str(path), "--out", str(out), "--force"])
    assert broken.exit_code == 1 and f"{path}:2: not valid JSON" in str(broken.exception)
    assert json.loads(out.read_text(encoding="utf-8").splitlines()[0])["messages"][0]["content"].startswith("[NAME_1]")
