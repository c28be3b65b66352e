"""Documents → passages: every format, Japanese normalisation, heading and article splits, bad files named."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from shitate.cli import app
from shitate.data.documents import chunks, import_documents, join_broken_lines, normalise, passages

HANDBOOK = Path(__file__).parents[3] / "shared" / "data" / "employee-handbook"
RULES = ["第1条 目的", "この規程は、社員の出張に関する事項を定める", "ものである。", "第2条 旅費", "出張旅費は、実費を支給する。"]
runner = CliRunner()


def make_pdf(path: Path, lines: list[str]) -> Path:
    from reportlab.pdfbase import pdfmetrics
    from reportlab.pdfbase.cidfonts import UnicodeCIDFont
    from reportlab.pdfgen import canvas

    pdfmetrics.registerFont(UnicodeCIDFont("HeiseiKakuGo-W5"))  # built into reportlab: no font file needed
    page = canvas.Canvas(str(path))
    page.setFont("HeiseiKakuGo-W5", 11)
    for row, line in enumerate(lines):
        page.drawString(50, 800 - 20 * row, line)
    page.save()
    return path


def make_docx(path: Path) -> Path:
    import docx

    document = docx.Document()
    document.add_heading("出張旅費規程", level=0)
    document.add_heading("第1章 総則", level=1)
    document.add_heading("第1条 目的", level=2)
    document.add_paragraph("この規程は、社員の出張に関する事項を定めるものである。")
    document.save(str(path))
    return path


def test_safe_normalisation_keeps_what_rules_mean():
    assert normalise("ＡＢＣ１２３　ｶﾀｶﾅ") == "ABC123 カタカナ"
    assert normalise("9時～18時") == "9時〜18時"  # cp932's FULLWIDTH TILDE is the wave dash
    assert normalise("①（株）「規則」") == "①（株）「規則」"  # full NFKC would turn these into 1, (株), …


def test_lines_broken_inside_a_sentence_are_joined_but_items_and_articles_kept():
    lines = join_broken_lines(["この規程は、社員の出張に", "関する事項を定める。", "1. 旅費は実費とする。", "第2条 旅費",
                               "The rules apply", "to everyone."])
    assert lines == ["この規程は、社員の出張に関する事項を定める。", "1. 旅費は実費とする。", "第2条 旅費",
                     "The rules apply to everyone."]


def test_long_sections_are_cut_at_sentence_ends_with_overlap():
    text = "".join(f"第{i}文はここまでである。" for i in range(1, 21))  # 20 sentences of 12-13 characters
    pieces = chunks(text, 100, 30)
    assert all(len(p) <= 100 for p in pieces) and len(pieces) > 2
    assert all(p.endswith("。") for p in pieces)
    for previous, current in zip(pieces, pieces[1:]):
        first_sentence = current.split("。")[0] + "。"
        assert first_sentence in previous  # the next passage starts with the previous one's last sentence
    assert "".join(pieces).count("第20文") == 1


def test_list_items_and_table_rows_keep_their_lines_when_a_section_is_cut():
    items = [f"{i}. 週所定労働日数{i}日の社員には{i * 2}日を与える。" for i in range(1, 9)]
    table = ["| 付与日 | 対象期間 |", "| :- | :- |", "| 3月21日 | 前年の3月21日から |"]
    lines = join_broken_lines(["前文である。", *table, *items])
    assert lines[1:4] == table  # rows are not sentences broken by a wrap
    pieces = chunks("\n".join(lines), 120, 40)
    assert len(pieces) > 1
    for piece in pieces:
        assert all(line in lines for line in piece.split("\n")), piece


def test_every_format_gives_the_same_articles(tmp_path):
    (tmp_path / "rules.md").write_text("# 出張旅費規程\n\n## 第1条　目的\n\nこの規程は、社員の出張に関する事項を定める\nものである。\n",
                                       encoding="utf-8")
    (tmp_path / "rules-sjis.txt").write_bytes("\n".join(RULES).encode("cp932"))
    (tmp_path / "rules-euc.txt").write_bytes("\n".join(RULES).encode("euc_jp"))
    (tmp_path / "rules.html").write_text("<html><head><style>p{}</style></head><body><h1>出張旅費規程</h1>"
                                         "<h2>第1条 目的</h2><p>この規程は、社員の出張に関する事項を定める"
                                         "ものである。</p><script>var x;</script></body></html>", encoding="utf-8")
    make_pdf(tmp_path / "rules.pdf", RULES)
    make_docx(tmp_path / "rules.docx")
    found, problems, files = import_documents(tmp_path)
    assert (problems, files) == ([], 6)
    by_file = {}
    for passage in found:
        by_file.setdefault(Path(passage.source).name, []).append(passage)
    for name, items in by_file.items():
        first = items[0]
        assert first.text == "第1条 目的\nこの規程は、社員の出張に関する事項を定めるものである。", name
        assert first.heading.endswith("第1条 目的"), name
    assert by_file["rules.docx"][0].heading == "出張旅費規程 > 第1章 総則 > 第1条 目的"
    assert by_file["rules-sjis.txt"][1].text == "第2条 旅費\n出張旅費は、実費を支給する。"


def test_the_employee_handbook_splits_into_its_articles():
    if not HANDBOOK.is_dir():
        pytest.skip("../shared/data/employee-handbook is not beside the checkout")
    found = passages(HANDBOOK / "01_就業規則.md", max_chars=0)
    headings = [p.heading for p in found]
    assert "就業規則 > 第1章 総則 > 第1条 目的" in headings
    articles = {h.split(" > ")[-1].split(" ")[0] for h in headings if "条" in h.split(" > ")[-1]}
    assert {"第1条", "第7条", "第61条"} <= articles
    probation = next(p for p in found if p.heading.endswith("第7条 試用期間"))
    assert "6か月間を試用期間とする" in probation.text


def test_bad_files_are_named_and_nothing_is_written_unless_skipped(tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "good.md").write_text("# 規程\n\n## 第1条 目的\n\n目的を定める。\n", encoding="utf-8")
    make_pdf(docs / "plain.pdf", RULES)
    from pypdf import PdfWriter

    writer = PdfWriter(clone_from=docs / "plain.pdf")
    writer.encrypt(user_password="secret", algorithm="RC4-128")
    writer.write(docs / "locked.pdf")
    (docs / "plain.pdf").unlink()
    (docs / "latin1.txt").write_bytes("caf\xe9 \xe0 la cr\xe8me \x80\x81\x82".encode("latin-1"))
    (docs / "empty.md").write_text("# 見出しだけ\n", encoding="utf-8")
    out = tmp_path / "passages.jsonl"
    result = runner.invoke(app, ["data", "import", str(docs), "--out", str(out)])
    assert result.exit_code == 1
    message = str(result.exception)
    assert f"{docs / 'locked.pdf'}: is an encrypted PDF that needs a password" in message
    assert f"{docs / 'latin1.txt'}: is not text in any of utf-8-sig, cp932, euc_jp" in message
    assert f"{docs / 'empty.md'}: has no text" in message
    assert "3 of 4 files could not be read" in message and "--skip-bad" in message
    assert not out.exists()

    result = runner.invoke(app, ["data", "import", str(docs), "--out", str(out), "--skip-bad"])
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert records == [{"text": "第1条 目的\n目的を定める。", "source": str(docs / "good.md"), "heading": "規程 > 第1条 目的"}]
    assert "3 files skipped" in " ".join(result.output.split())

    (tmp_path / "none").mkdir()
    result = runner.invoke(app, ["data", "import", str(tmp_path / "none"), "--out", str(out), "--force"])
    assert result.exit_code == 1 and "has no documents" in str(result.exception)
