import json

import pytest

from conftest import SHARED_DATA, write_jsonl
from shitate.data.formats import conversation, import_records, read_chat
from shitate.data.formats import write_jsonl as write_atomic
from shitate.errors import DataError, ShitateError

QA = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]


def test_csv_with_byte_order_mark_and_system_prompt(tmp_path):
    path = tmp_path / "qa.csv"
    path.write_bytes("question,answer\nなんで空は青いの?,光が散らばるからだよ。\n".encode("utf-8-sig"))
    records, _ = import_records(path, system="先生です。")
    assert records == [{"messages": [{"role": "system", "content": "先生です。"},
                                     {"role": "user", "content": "なんで空は青いの?"},
                                     {"role": "assistant", "content": "光が散らばるからだよ。"}]}]


def test_tsv_with_column_mapping(tmp_path):
    path = tmp_path / "qa.tsv"
    path.write_text("id\t質問\t回答\n1\tQ\tA\n", encoding="utf-8")
    records, _ = import_records(path, question_column="質問", answer_column="回答")
    assert records[0]["messages"] == QA


def test_a_japanese_header_is_recognised_without_naming_the_columns(tmp_path):
    path = tmp_path / "faq.csv"
    path.write_text("番号,質問,答え\n1,Q,A\n", encoding="cp932")  # as Excel on a Japanese Windows saves it
    records, _ = import_records(path)
    assert records[0]["messages"] == QA


def test_a_table_given_where_chat_jsonl_belongs_is_named_with_the_import_command(tmp_path):
    path = tmp_path / "faq.csv"
    path.write_text("question,answer\nQ,A\n", encoding="utf-8")
    with pytest.raises(DataError) as err:
        read_chat(path)
    assert "is a CSV table, not JSON Lines" in str(err.value) and "shitate data import" in str(err.value)


def test_unknown_column_lists_the_header(tmp_path):
    path = tmp_path / "qa.csv"
    path.write_text("q,a\nQ,A\n", encoding="utf-8")
    with pytest.raises(DataError) as err:
        import_records(path)
    assert "qa.csv:1: question, answer: column not found; the header has: q, a" in str(err.value)


def test_empty_csv_cell_names_the_line(tmp_path):
    path = tmp_path / "qa.csv"
    path.write_text("question,answer\nQ,A\nQ2,\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"qa.csv:3: answer: is empty"):
        import_records(path)
    records, skipped = import_records(path, skip_bad=True)
    assert len(records) == 1 and skipped[0].line == 3


@pytest.mark.parametrize("record, expected", [
    ({"messages": QA}, {"messages": QA}),
    ({"instruction": "Q", "input": "", "output": "A"}, {"messages": QA}),
    ({"instruction": "Q", "input": "X", "output": "A"},
     {"messages": [{"role": "user", "content": "Q\n\nX"}, {"role": "assistant", "content": "A"}]}),
    ({"instruction": "Q", "context": "C", "response": "A", "category": "closed_qa"}, {"messages": QA, "context": "C"}),
    ({"conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]}, {"messages": QA}),
    ({"prompt": "Q", "completion": "A"}, {"messages": QA}),
], ids=["chat", "alpaca", "alpaca-input", "dolly", "sharegpt", "prompt-completion"])
def test_jsonl_formats_are_detected_and_converted(tmp_path, record, expected):
    records, _ = import_records(write_jsonl(tmp_path / "in.jsonl", [record]))
    assert records == [expected]


def test_bad_json_and_bad_records_are_all_reported_with_lines(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_text('{"prompt": "Q", "completion": "A"}\n{"prompt": "Q",\n\n{"foo": 1}\n'
                    '{"conversations": [{"from": "robot", "value": "x"}]}\n', encoding="utf-8")
    with pytest.raises(DataError) as err:
        import_records(path)
    lines = str(err.value).splitlines()
    assert lines[0].startswith(f"{path}:2: not valid JSON")
    assert lines[1].startswith(f"{path}:4: unrecognised record (keys: foo)")
    assert lines[2].startswith(f"{path}:5: conversations[0].from: is 'robot'")


def test_missing_file_is_a_user_error(tmp_path):
    with pytest.raises(ShitateError, match="file not found"):
        import_records(tmp_path / "nope.jsonl")


@pytest.mark.skipif(not (SHARED_DATA / "dolly-ja").is_dir(), reason="shared data not beside the checkout")
def test_real_dolly_ja_records(tmp_path):
    source = SHARED_DATA / "dolly-ja" / "databricks-dolly-15k-ja.jsonl"
    excerpt = tmp_path / "dolly.jsonl"
    with source.open(encoding="utf-8") as handle:
        excerpt.write_text("".join(next(handle) for _ in range(50)), encoding="utf-8")
    records, _ = import_records(excerpt, fmt="dolly")
    assert len(records) == 50
    first = json.loads(source.open(encoding="utf-8").readline())
    assert records[0]["messages"][0]["content"] == first["instruction"].strip()
    assert records[0].get("context", "") == first["input"].strip()


def test_context_goes_before_the_first_question():
    record = {"messages": QA, "context": "第1条 …"}
    assert conversation(record, "sys")[:2] == [{"role": "system", "content": "sys"},
                                               {"role": "user", "content": "第1条 …\n\nQ"}]


def test_atomic_write_roundtrip(tmp_path):
    out = tmp_path / "sub" / "out.jsonl"
    assert write_atomic(out, [{"messages": QA}] * 3) == 3
    assert read_chat(out) == [(1, {"messages": QA}), (2, {"messages": QA}), (3, {"messages": QA})]
    assert [p.name for p in out.parent.iterdir()] == ["out.jsonl"]


def test_a_csv_saved_by_excel_in_cp932_imports_as_it_is(tmp_path):
    path = tmp_path / "qa.csv"
    rows = "質問,回答\r\n有給休暇は何日?,入社半年で10日です。\r\n\"複数行の\r\n質問\",〜まで(①)です。\r\n"
    path.write_bytes(rows.encode("cp932"))
    detected, _ = import_records(path, question_column="質問", answer_column="回答")
    named, _ = import_records(path, question_column="質問", answer_column="回答", encoding="cp932")
    assert detected == named
    assert [r["messages"][0]["content"] for r in detected] == ["有給休暇は何日?", "複数行の\n質問"]
    assert detected[1]["messages"][1]["content"] == "〜まで(①)です。"


def test_jsonl_in_shift_jis_is_refused_whole_and_imports_with_its_encoding(tmp_path):
    path = tmp_path / "qa.jsonl"
    path.write_bytes((json.dumps({"messages": QA[:1] + [{"role": "assistant", "content": "答えです"}]},
                                 ensure_ascii=False) + "\n").encode("cp932") * 3)
    with pytest.raises(DataError, match=r"qa.jsonl: is not UTF-8: it reads as cp932 — .*--encoding cp932"):
        import_records(path)
    records, _ = import_records(path, encoding="cp932")
    assert len(records) == 3 and records[0]["messages"][1]["content"] == "答えです"
    with pytest.raises(ShitateError, match="--encoding 'sjiss': not an encoding"):
        import_records(path, encoding="sjiss")


def test_one_stray_byte_is_reported_on_its_line_and_the_rest_is_read(tmp_path):
    path = tmp_path / "qa.jsonl"
    good = json.dumps({"messages": QA}).encode()
    path.write_bytes(b"\n".join([good, good.replace(b'"A"', b'"A\xff"'), good]) + b"\n")
    records, problems = import_records(path, skip_bad=True)
    assert len(records) == 2
    assert [str(p) for p in problems] == [f"{path}:2: not valid UTF-8 (byte 0xff at byte {good.index(b'A') + 2} of the "
                                          "line) — re-save the file as UTF-8 or fix the line; a stray byte often comes "
                                          "from pasting between programs"]


def test_a_json_array_imports_with_the_line_of_each_item(tmp_path):
    path = tmp_path / "qa.json"
    path.write_text(json.dumps([{"instruction": "Q", "output": "A"}, {"instruction": "Q2"}], indent=2), encoding="utf-8")
    records, problems = import_records(path, skip_bad=True)
    assert records == [{"messages": QA}]
    assert [(p.line, p.field, p.message) for p in problems] == [(6, None, "unrecognised record (keys: instruction)")]


def test_a_json_array_on_one_line_imports_too_and_lines_of_lists_stay_lines(tmp_path):
    # json.dump without indent writes the whole array on one line; it was read as one record, "keys: list".
    path = tmp_path / "qa.json"
    path.write_text(json.dumps([{"instruction": "Q", "output": "A"}] * 2) + "\n\n", encoding="utf-8")
    records, problems = import_records(path, skip_bad=True)
    assert records == [{"messages": QA}] * 2 and problems == []
    lists = tmp_path / "lists.jsonl"  # a JSON value a line, each a list: lines, each one unrecognised
    lists.write_text(f"{json.dumps(QA)}\n{json.dumps([{'instruction': 'Q', 'output': 'A'}])}\n", encoding="utf-8")
    with pytest.raises(DataError) as raised:
        import_records(lists)
    assert [(p.line, p.message) for p in raised.value.problems] == [(1, "unrecognised record (keys: list)"),
                                                                  (2, "unrecognised record (keys: list)")]


def test_a_broken_line_that_opens_a_bracket_does_not_hide_the_lines_after_it(tmp_path):
    path = tmp_path / "qa.jsonl"
    good = json.dumps({"messages": QA})
    path.write_text(f"[{good}\n{good}\n{{oops\n{good}\n", encoding="utf-8")
    records, problems = import_records(path, skip_bad=True)
    assert len(records) == 2 and [p.line for p in problems] == [1, 3]


def test_weights_on_answers_are_kept_and_wrong_ones_named_with_their_line(tmp_path):
    from shitate.data.validate import check_file

    good = {"messages": [*QA, {"role": "user", "content": "Q2"}, {"role": "assistant", "content": "A2", "weight": 1}]}
    good["messages"][1] = {**QA[1], "weight": 0}
    bad = [{"messages": [{**QA[0], "weight": 0}, QA[1]]},
           {"messages": [QA[0], {**QA[1], "weight": 0.5}]},
           {"messages": [QA[0], {**QA[1], "weight": 0}]},
           {"messages": QA, "weight": 0},
           {"messages": QA, "weight": 2}]
    path = tmp_path / "weighted.jsonl"
    write_jsonl(path, [good, *bad])
    expected = [f"{path}:2: messages[0].weight: is set on a user message",
                f"{path}:3: messages[1].weight: is 0.5",
                f"{path}:4: messages: has no trained turn: every assistant weight is 0",
                f"{path}:5: messages: has no trained turn: every assistant weight is 0",
                f"{path}:6: weight: is 2"]
    assert [str(p).split(" — ")[0] for p in check_file(path).errors] == expected
    with pytest.raises(DataError) as refused:  # training reads the file the same way
        read_chat(path)
    assert [str(p).split(" — ")[0] for p in refused.value.problems] == expected
    path.write_text(json.dumps(good) + "\n")
    assert read_chat(path)[0][1] == good  # the weights survive reading (and `data import`, which uses the same)
    # A weight on the record (the design's chat format) is the default of the answers that have none.
    path.write_text(json.dumps({"messages": [*QA, {"role": "user", "content": "Q2"},
                                             {"role": "assistant", "content": "A2", "weight": 1}], "weight": 0}) + "\n")
    assert [m.get("weight") for m in read_chat(path)[0][1]["messages"]] == [None, 0, None, 1]


def test_text_parts_are_joined_and_tool_calls_named_with_what_to_do(tmp_path):
    # OpenAI's fine-tuning format allows content as parts and function-calling turns; a tool call said
    # "content: missing — add a non-empty content field", which is not what is wrong.
    from shitate.data.validate import check_file

    parts = {"messages": [{"role": "user", "content": [{"type": "text", "text": "Q"}, {"type": "text", "text": "Q2"}]},
                          QA[1]]}
    tool = {"messages": [QA[0], {"role": "assistant", "content": None, "tool_calls": [
        {"id": "1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "1", "content": "r"}, QA[1]]}
    image = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}, QA[1]]}
    path = tmp_path / "openai.jsonl"
    write_jsonl(path, [parts, tool, image])
    records, problems = import_records(path, skip_bad=True)
    assert records == [{"messages": [{"role": "user", "content": "Q\nQ2"}, QA[1]]}]
    assert [(p.line, p.field, p.message) for p in problems] == [
        (2, "messages[1]", "is part of a tool call (function calling)"),
        (3, "messages[0].content", "has a part that is not text (an image, audio, …)")]
    assert "drop the tool calls" in problems[0].fix
    checked = check_file(path)
    assert [(p.line, p.field, p.message) for p in checked.errors] == [
        (1, "messages[0].content", "is a list of content parts, expected a string"),
        (2, "messages[1]", "is part of a tool call (function calling)"),
        (2, "messages[2]", "is part of a tool call (function calling)"),
        (3, "messages[0].content", "is a list of content parts, expected a string")]
    assert "shitate data import openai.jsonl" in checked.errors[0].fix
