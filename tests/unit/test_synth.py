"""QA generation: template questions from articles, parsing a generator's output, and each filter counted."""

from __future__ import annotations

import sys

import pytest

from shitate.data.synth import SynthFilters, parse_pairs, repeats_itself, support, synthesize, template_pairs
from shitate.errors import ShitateError

ARTICLE = {"text": "第7条 試用期間\n1. 社員として新たに採用した者については、採用した日から6か月間を試用期間とする。",
           "source": "docs/01_就業規則.md", "heading": "就業規則 > 第2章 採用 > 第7条 試用期間"}
SECTION = {"text": "主な特徴\n- すべての社員にフレックスタイム制を適用している", "source": "docs/README.md",
           "heading": "株式会社ツクロア 就業規則 > 主な特徴"}


def test_an_article_becomes_questions_whose_answer_cites_it():
    pairs = template_pairs(ARTICLE)
    assert [q for q, _ in pairs] == ["就業規則の第7条（試用期間）には何が定められていますか。",
                                     "就業規則では、試用期間についてどのように定められていますか。"]
    answer = pairs[0][1]
    assert answer.startswith("就業規則第7条（試用期間）では、次のように定めています。\n1. 社員として")
    assert template_pairs(SECTION) == [("株式会社ツクロア 就業規則の「主な特徴」について教えてください。",
                                        "- すべての社員にフレックスタイム制を適用している")]
    assert template_pairs({"text": "見出しのない文章。", "source": "a.txt", "heading": ""}) == []


def test_a_generators_output_is_parsed_into_pairs():
    output = " 試用期間は何か月ですか。\n回答: 6か月間\n質問：誰に適用されますか。\n答え: 新たに採用した者\n\n文章:\n別の文章"
    assert parse_pairs(output) == [("試用期間は何か月ですか。", "6か月間"), ("誰に適用されますか。", "新たに採用した者")]
    assert parse_pairs("ランダムな出力") == []


def test_support_is_high_for_a_quotation_and_low_for_an_invention():
    passage = ARTICLE["text"]
    assert support("採用した日から6か月間", passage) == 1.0
    assert support("給与は月末に銀行振込で支払う", passage) < 0.2


def test_each_filter_drops_its_case_and_is_counted():
    outputs = {
        ARTICLE["text"]: "試用期間は何か月ですか。\n回答: 6か月間\n"          # kept
                         "質問: 試用期間は何か月ですか。\n回答: 6か月\n"          # duplicate question
                         "質問: 6か月間の試用期間は誰に適用されますか。\n回答: 6か月間\n"  # gives its answer away
                         "質問: 給与はいつ払われますか。\n回答: 毎月25日に銀行振込\n"  # not in the passage
                         "質問: 何が定められていますか。\n回答: " + "試用期間" * 300 + "\n"  # over-long
                         "質問: 第7条 試用期間\n回答: 6か月間を試用期間とする\n"  # a title, not a question
                         "質問: 試用期間はいつからですか。\n回答: " + "採用した日から、" * 4 + "\n"  # a loop
                         "質問: 誰が試用期間の対象ですか。\n回答: 新たに採用した者",  # kept
    }

    def ask(prompts):
        return [next(out for text, out in outputs.items() if text in prompt) for prompt in prompts]

    records, report = synthesize([ARTICLE], "model", ask, per_passage=10, filters=SynthFilters(max_answer_chars=200))
    assert report.generated == 8 and report.kept == 2
    assert dict(report.dropped) == {"duplicate question": 1, "question contains answer": 1, "answer repeats itself": 1,
                                    "answer not in passage": 1, "over-long": 1, "not a question": 1}
    assert records[0] == {"messages": [{"role": "user", "content": "試用期間は何か月ですか。"},
                                       {"role": "assistant", "content": "6か月間"}],
                          "context": ARTICLE["text"], "source": ARTICLE["source"], "heading": ARTICLE["heading"]}
    assert records[1]["messages"][1]["content"] == "新たに採用した者"


def test_a_phrase_is_a_loop_only_when_the_answer_repeats_it_more_than_its_passage():
    loop = "作業ブランチの作成者と作業ブランチの作成者の間で、作業ブランチの作成者と"
    assert repeats_itself(loop, "作業ブランチの作成者は、レビューを依頼する。")
    listing = "- この規則は、令和2年4月に施行する。\n- この規則は、令和4年に改正する。\n- この規則は、令和5年に改正する。"
    assert not repeats_itself(listing, "附則\n" + listing)


def test_a_missing_dedupe_package_is_named_before_the_generator_runs(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasketch", None)  # as if shitate[documents] were not installed
    asked = []
    with pytest.raises(ShitateError, match=r"near-duplicate search needs the datasketch package"):
        synthesize([ARTICLE], "model", lambda prompts: asked.append(prompts) or [""] * len(prompts))
    assert not asked  # a generator may take hours on a folder of documents: nothing was asked of it


def test_an_article_cut_into_passages_is_asked_about_whole(tmp_path):
    """`data import` cuts a long article into overlapping passages; template mode asks about the whole article once,
    not about its first piece while the later pieces are dropped as repeated questions."""
    from shitate.data.documents import passages

    clauses = [f"{n}. 社員は、第{n}項に定める手続きを{n}日以内に済ませなければならない。" for n in range(1, 9)]
    (tmp_path / "01_就業規則.md").write_text("# 就業規則\n## 第9条 手続き\n" + "\n".join(clauses) + "\n", encoding="utf-8")
    pieces = [p.record() for p in passages(tmp_path / "01_就業規則.md", max_chars=150, overlap=60)]
    assert len(pieces) >= 3 and pieces[1]["text"].split("\n")[1] in pieces[0]["text"]  # cut, with overlap

    records, report = synthesize(pieces)
    assert report.dropped["duplicate question"] == 0
    answers = {record["messages"][1]["content"] for record in records}
    assert len(records) == 2 and len(answers) == 1  # the article's two questions, one answer
    assert answers.pop().endswith("次のように定めています。\n" + "\n".join(clauses))  # every clause, each once
    assert records[0]["context"] == "第9条 手続き\n" + "\n".join(clauses)

    # An article too long for one answer is asked about in parts: each later part for its continuation, with only
    # what the part before did not say, so every clause is answered exactly once and no question repeats.
    records, report = synthesize(pieces, filters=SynthFilters(max_answer_chars=200))
    assert not report.dropped and all(len(r["messages"][1]["content"]) <= 200 for r in records)
    questions = [r["messages"][0]["content"] for r in records]
    assert questions[:2] == ["就業規則の第9条（手続き）には何が定められていますか。",
                             "就業規則では、手続きについてどのように定められていますか。"]
    assert questions[2:] == [f"就業規則第9条（手続き）の続き（その{n}）を教えてください。" for n in range(2, len(questions))]
    answered = "\n".join(r["messages"][1]["content"].partition("\n")[2] for r in records[1:])
    assert [answered.count(clause) for clause in clauses] == [1] * len(clauses)


def test_pieces_without_a_shared_sentence_are_joined_by_a_line_break():
    from shitate.data.synth import _join_overlapping

    assert _join_overlapping("一つ目の文。二つ目の文。", "二つ目の文。三つ目の文。") == "一つ目の文。二つ目の文。三つ目の文。"
    assert _join_overlapping("前の段落です。", "すぐ次の段落です。") == "前の段落です。\nすぐ次の段落です。"


def test_a_long_section_under_a_plain_heading_is_asked_about_in_parts(tmp_path):
    from shitate.data.documents import passages

    items = [f"- 社員は、第{n}の制度を年に{n}回まで利用できる。" for n in range(1, 12)]
    (tmp_path / "README.md").write_text("# 就業規則\n## 主な特徴\n" + "\n".join(items) + "\n", encoding="utf-8")
    pieces = [p.record() for p in passages(tmp_path / "README.md", max_chars=150, overlap=60)]
    records, report = synthesize(pieces, filters=SynthFilters(max_answer_chars=200))
    questions = [r["messages"][0]["content"] for r in records]
    assert len(records) >= 2 and not report.dropped
    assert questions == ["就業規則の「主な特徴」について教えてください。"] + [
        f"就業規則の「主な特徴」の続き（その{n}）を教えてください。" for n in range(2, len(records) + 1)]
    answered = "\n".join(r["messages"][1]["content"] for r in records)
    assert [answered.count(item) for item in items] == [1] * len(items)
