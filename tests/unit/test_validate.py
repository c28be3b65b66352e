from pathlib import Path

from shitate.data.templates import get_template
from shitate.data.validate import check_file, histogram

BROKEN = "\n".join([
    '{"messages": [{"role": "user", "content": "なんで空は青いの?"}, {"role": "assistant", "content": "光だよ。"}]}',
    '{"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}',
    '{"messages": [{"role": "user", "content": "Q"}, {"role": "bot", "content": "A"}]}',
    '{"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "  "}]}',
    '{"messages": [{"role": "user", "content": "Q"}]}',
    '{"messages": [{"role": "user", "content": "Q<start_of_turn>"}, {"role": "assistant", "content": "A"}]}',
    '{"instruction": "Q", "input": "", "output": "A"}',
    '[1, 2]',
    '{"messages": [{"role": "user", "content": "なんで空は青いの?"}, {"role": "assistant", "content": "光だよ。"}]}',
    '{"messages": [{"role": "user", "content": "Q"}, {"role": "assistant"}]}',
]) + "\n"


def test_every_problem_has_its_line_field_and_fix(tmp_path: Path):
    path = tmp_path / "broken.jsonl"
    path.write_text(BROKEN, encoding="utf-8")
    report = check_file(path)
    errors = [str(p) for p in report.errors]
    assert errors[0].startswith(f"{path}:2: not valid JSON")
    assert errors[1] == f"{path}:3: messages[1].role: is 'bot'; expected one of system, user, assistant"
    assert f"{path}:3: messages: does not end with an assistant turn — add the answer the model should learn, or drop the record" in errors
    assert f"{path}:4: messages[1].content: is empty — write the turn's text or drop the record" in errors
    assert f"{path}:5: messages: does not end with an assistant turn — add the answer the model should learn, or drop the record" in errors
    assert any(e.startswith(f"{path}:6: messages[0].content: contains the special token string '<start_of_turn>'") for e in errors)
    assert f"{path}:7: messages: missing — this looks like alpaca data: convert it with `shitate data import`" in errors
    assert f"{path}:8: is a JSON list, expected an object" in errors
    assert f"{path}:10: messages[1].content: missing — add the text of the turn" in errors
    assert report.records == 2 and report.duplicates == 1
    assert [w.line for w in report.warnings] == [9]


def test_token_counts_and_over_long_examples(tmp_path: Path, tokenizer):
    path = tmp_path / "ok.jsonl"
    path.write_text(BROKEN.splitlines()[0] + "\n", encoding="utf-8")
    report = check_file(path, tokenizer, get_template("gemma", tokenizer), max_length=5)
    assert report.tokens["user"] == len(tokenizer("なんで空は青いの?", add_special_tokens=False)["input_ids"])
    assert report.lengths[0] > 5
    assert "longer than max_length 5" in str(report.warnings[0]) and report.warnings[0].line == 1


def test_histogram_buckets_cover_all_lengths():
    buckets = histogram([10, 11, 12, 30, 50], bins=4)
    assert sum(count for _, _, count in buckets) == 5
    assert buckets[0][0] == 10 and buckets[-1][1] >= 50
