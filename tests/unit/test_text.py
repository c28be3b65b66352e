"""Raw text for stage pretrain: encodings, binary and empty files, rows that keep documents apart."""

from __future__ import annotations

import json

import pytest

from shitate.data.collate import documents_to_rows, loss_positions, segments_batch
from shitate.data.templates import IGNORE_INDEX
from shitate.data.text import read_documents
from shitate.data.validate import check_text_file, is_text_data
from shitate.errors import DataError

# No 〜 here: cp932 maps its byte pair to ～ (U+FF5E), so a round trip through it would not be exact.
JAPANESE = "吾輩は猫である。名前はまだ無い。どこで生れたかとんと見当がつかぬ。"


@pytest.mark.parametrize("encoding", ["utf-8", "utf-8-sig", "cp932", "euc_jp"])
def test_japanese_text_files_are_read_in_their_encoding(tmp_path, encoding):
    path = tmp_path / "neko.txt"
    path.write_bytes(JAPANESE.encode(encoding))
    assert [d.text for d in read_documents(path)] == [JAPANESE]


def test_a_binary_file_is_refused_with_its_name(tmp_path):
    path = tmp_path / "scan.txt"
    path.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)))
    with pytest.raises(DataError, match=r"scan.txt: is a binary file, not text"):
        read_documents(path)


def test_an_empty_file_and_an_empty_folder_are_refused(tmp_path):
    (tmp_path / "empty.txt").write_text("  \n", encoding="utf-8")
    with pytest.raises(DataError, match=r"empty.txt: has no text — is the file empty"):
        read_documents(tmp_path / "empty.txt")
    (tmp_path / "nothing").mkdir()
    with pytest.raises(DataError, match="has no .txt or .md files"):
        read_documents(tmp_path / "nothing")


def test_a_folder_gives_one_document_a_file_in_name_order(tmp_path):
    (tmp_path / "b.md").write_text("# 第2条\n本文二", encoding="utf-8")
    (tmp_path / "a.txt").write_bytes("第1条 本文一".encode("cp932"))
    (tmp_path / "image.png").write_bytes(b"\x89PNG\x00")
    assert [d.text for d in read_documents(tmp_path)] == ["第1条 本文一", "# 第2条\n本文二"]


def test_a_chat_file_given_to_pretrain_names_the_stage_to_use(tmp_path):
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "やあ"}]}) + "\n", encoding="utf-8")
    with pytest.raises(DataError) as err:
        read_documents(path)
    assert "chat.jsonl:1: text: missing: this is a chat record" in str(err.value) and "stage: sft" in str(err.value)


def test_check_reports_empty_binary_and_over_long_records_by_line(tmp_path, tokenizer):
    path = tmp_path / "text.jsonl"
    lines = [{"text": "短い文です。"}, {"text": "   "}, {"text": "abc\x00\x01\x02def"}, {"text": "長い" * 200},
             {"text": "短い文です。"}]
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in lines), encoding="utf-8")
    assert is_text_data(path)
    report = check_text_file(path, tokenizer, max_length=64)
    errors = [str(p) for p in report.errors]
    warnings = [str(p) for p in report.warnings]
    assert any(e.startswith(f"{path}:2: text: is empty") for e in errors)
    assert any(e.startswith(f"{path}:3: text: contains binary data") for e in errors)
    assert any(w.startswith(f"{path}:4: is ") and "longer than the block size 64" in w for w in warnings)
    assert any(w.startswith(f"{path}:5: repeats an earlier document") for w in warnings)
    assert report.records == 3


def test_documents_are_packed_whole_and_a_long_one_restarts_with_bos():
    documents = [[1, 10, 11, 12, 2], [1, 20, 21, 2], [1, 30, 31, 32, 33, 34, 35, 2]]
    rows = documents_to_rows(documents, block_size=7, bos_id=1)
    # Only the document longer than a row is cut; its second piece starts again with <bos>.
    assert [r["input_ids"] for r in rows] == [[1, 30, 31, 32, 33, 34, 35], [1, 10, 11, 12, 2, 1, 2], [1, 20, 21, 2]]
    assert [r["segments"] for r in rows] == [[7], [5, 2], [4]]
    # The first token of each piece has no label: nothing of its document precedes it in the row.
    assert rows[1]["labels"] == [IGNORE_INDEX, 10, 11, 12, 2, IGNORE_INDEX, 2]
    assert [loss_positions(r) for r in rows] == [6, 5, 3]
    batch = segments_batch(rows, pad_id=0, device="cpu")
    assert batch["packed_lengths"] == [[7], [5, 2], [4, 3]]
    assert batch["position_ids"][1].tolist() == [0, 1, 2, 3, 4, 0, 1]
    assert batch["labels"][2].tolist() == [IGNORE_INDEX, 20, 21, 2, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX]
