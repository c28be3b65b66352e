"""QA generation: template questions from articles, parsing a generator's output, and each filter counted."""

from __future__ import annotations

from shitate.data.synth import SynthFilters, parse_pairs, support, synthesize, template_pairs

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
                         "質問: 第7条 試用期間\n回答: 6か月間を試用期間とする",  # a title, not a question
    }

    def ask(prompts):
        return [next(out for text, out in outputs.items() if text in prompt) for prompt in prompts]

    records, report = synthesize([ARTICLE], "model", ask, per_passage=10, filters=SynthFilters(max_answer_chars=200))
    assert report.generated == 6 and report.kept == 1
    assert dict(report.dropped) == {"duplicate question": 1, "question contains answer": 1,
                                    "answer not in passage": 1, "over-long": 1, "not a question": 1}
    assert records == [{"messages": [{"role": "user", "content": "試用期間は何か月ですか。"},
                                      {"role": "assistant", "content": "6か月間"}],
                        "context": ARTICLE["text"], "source": ARTICLE["source"], "heading": ARTICLE["heading"]}]
