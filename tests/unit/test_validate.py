import json
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


def test_any_string_the_tokenizer_reads_as_a_control_token_is_named(tmp_path: Path):
    """Every added token flagged special, and Gemma 3's image markers (a GGUF file leaves them unflagged), is an
    error in content; added tokens that are text (Gemma's <table>, whitespace runs) and look-alikes are not."""
    import json

    from transformers import AutoTokenizer

    from shitate.data.preference import check_preference_file

    tokenizer = AutoTokenizer.from_pretrained(Path(__file__).parents[1] / "assets" / "tiny-tokenizer")
    tokenizer.add_tokens(["<start_of_image>", "[multimodal]", "<table>", "\n\n\n"])  # not special, as the GGUF has them
    tokenizer.add_special_tokens({"additional_special_tokens": ["<unused7>"]})
    content = "図<start_of_image>を見て[multimodal]\n\n\nここ<unused7>と<table>と<br>と[注]と<start_of_image>"
    chats = tmp_path / "chats.jsonl"
    chats.write_text(json.dumps({"messages": [{"role": "user", "content": content},
                                              {"role": "assistant", "content": "はい"}]}, ensure_ascii=False) + "\n")
    named = [p.message.split("string ")[1] for p in check_file(chats, tokenizer).errors]
    assert named == ["'<start_of_image>'", "'[multimodal]'", "'<unused7>'"]
    without_tokenizer = [p.message.split("string ")[1] for p in check_file(chats).errors]
    assert without_tokenizer == ["'<start_of_image>'", "'[multimodal]'"]  # <unused7> is known from the tokenizer

    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"prompt": "見て", "chosen": content, "rejected": "いいえ"}, ensure_ascii=False) + "\n")
    report = check_preference_file(pairs, tokenizer)
    assert [(p.field, p.message.split("string ")[1]) for p in report.errors] == [
        ("chosen", "'<start_of_image>'"), ("chosen", "'[multimodal]'"), ("chosen", "'<unused7>'")]


def test_an_answer_the_model_s_own_template_rewrites_is_named_with_its_line(tmp_path: Path, tokenizer):
    # Qwen3's template drops reasoning inside <think> from answers before the last question: trained as written,
    # those answers would not be where the mask puts them.
    tokenizer = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    tokenizer.chat_template = (Path(__file__).parents[1] / "assets/qwen3_chat_template.jinja").read_text(encoding="utf-8")
    turns = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "<think>考え</think>答えだよ。"},
             {"role": "user", "content": "Q2"}, {"role": "assistant", "content": "A2"}]
    path = tmp_path / "chats.jsonl"
    path.write_text(json.dumps({"messages": turns[2:]}) + "\n" + json.dumps({"messages": turns}) + "\n", encoding="utf-8")
    report = check_file(path, tokenizer, get_template("auto", tokenizer))
    assert [(p.line, p.field) for p in report.errors] == [(2, "messages")] and report.records == 1
    assert "the answer '<think>考え</think>答えだよ。' is not in" in report.errors[0].message
