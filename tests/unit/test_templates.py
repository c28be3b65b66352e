from pathlib import Path

import pytest

from conftest import MULTI_TURN
from shitate.data.templates import (
    IGNORE_INDEX,
    encode_chat,
    get_template,
    stop_token_ids,
)
from shitate.errors import ConfigError

CHATML_JINJA = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

CONVERSATION = MULTI_TURN


@pytest.fixture(params=["gemma", "chatml", "llama3", "plain", "auto"])
def template(request, tokenizer):
    if request.param == "auto":
        tokenizer = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
        tokenizer.chat_template = CHATML_JINJA
        return get_template("auto", tokenizer), tokenizer
    return get_template(request.param, tokenizer), tokenizer


def masked_runs(example, tokenizer):
    """Decode each run of consecutive labelled tokens."""
    runs, current = [], []
    for token, label in zip(example["input_ids"], example["labels"]):
        if label != IGNORE_INDEX:
            assert label == token
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return [tokenizer.decode(run) for run in runs]


def test_mask_covers_exactly_each_answer_and_its_end_marker(template):
    chat_template, tokenizer = template
    example = encode_chat(CONVERSATION, tokenizer, chat_template, max_length=10_000)
    expected = [m["content"] + chat_template.end_of_turn for m in CONVERSATION if m["role"] == "assistant"]
    assert masked_runs(example, tokenizer) == expected


def test_inference_renders_the_same_bytes_as_training(template):
    chat_template, tokenizer = template
    for cut in (2, 4):  # ask at each user turn
        prompt = chat_template(CONVERSATION[:cut], add_generation_prompt=True)
        trained = chat_template(CONVERSATION[: cut + 1])
        assert trained.startswith(prompt)
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        trained_ids = encode_chat(CONVERSATION[: cut + 1], tokenizer, chat_template, 10_000)["input_ids"]
        assert trained_ids[: len(prompt_ids)] == prompt_ids


def test_generation_stops_at_the_end_marker_and_eos(template):
    chat_template, tokenizer = template
    stops = stop_token_ids(tokenizer, chat_template)
    assert tokenizer.eos_token_id in stops
    assert tokenizer.convert_tokens_to_ids(chat_template.end_of_turn) in stops


def test_truncation_cuts_on_the_right(tokenizer):
    gemma = get_template("gemma", tokenizer)
    full = encode_chat(CONVERSATION, tokenizer, gemma, 10_000)
    cut = encode_chat(CONVERSATION, tokenizer, gemma, 20)
    assert cut["input_ids"] == full["input_ids"][:20] and cut["labels"] == full["labels"][:20]


def test_gemma_puts_the_system_prompt_in_the_first_user_turn(tokenizer):
    text = get_template("gemma", tokenizer)(CONVERSATION[:2], add_generation_prompt=True)
    assert text == ("<bos><start_of_turn>user\nあなたは子どもの疑問に答えるチャットボットです。\n\nなんで空は青いの?"
                    "<end_of_turn>\n<start_of_turn>model\n")


def test_auto_falls_back_to_the_model_family(tokenizer):
    assert get_template("auto", tokenizer, "gemma3_text").name == "gemma"
    assert get_template("auto", tokenizer, "llama").name == "llama3"
    assert get_template("auto", tokenizer, "qwen2").name == "chatml"


def test_auto_picks_plain_for_a_base_model_that_knows_no_turn_markers():
    # A Japanese GPT-2 or a Llama 2 has no chat template and none of the built-in templates' markers: ChatML's
    # <|im_end|> came out in pieces, and generation could not stop at one of them.
    from tiny_families import gpt2_like_tokenizer

    gpt2_like = gpt2_like_tokenizer()

    for family in ("gpt2", "llama", "qwen2"):
        template = get_template("auto", gpt2_like, family)
        assert template.name == "plain" and template.end_of_turn == "<|endoftext|>"
    example = encode_chat(MULTI_TURN[1:3], gpt2_like, template, 256)
    labelled = [label for label in example["labels"] if label != IGNORE_INDEX]
    assert labelled[-1] == gpt2_like.eos_token_id  # the answer ends with one token generation stops at
    assert stop_token_ids(gpt2_like, template) == [gpt2_like.eos_token_id]


@pytest.mark.parametrize("name", ["gemma", "chatml", "llama3", "plain"])
def test_each_template_s_jinja_renders_the_same_bytes_as_training(tokenizer, name):
    """The Jinja written into an export's tokenizer_config.json is what transformers, vLLM and TGI will render."""
    template = get_template(name, tokenizer)
    conversations = [MULTI_TURN, MULTI_TURN[1:], MULTI_TURN[:2], MULTI_TURN[1:4]]
    for messages in conversations:
        for generation_prompt in (False, True):
            rendered = tokenizer.apply_chat_template(messages, chat_template=template.jinja, tokenize=False,
                                                     add_generation_prompt=generation_prompt)
            assert rendered == template(messages, add_generation_prompt=generation_prompt), (messages, generation_prompt)


def test_an_answer_with_weight_0_stays_in_the_context_but_out_of_the_loss(template):
    # OpenAI's fine-tuning format: {"role": "assistant", "content": …, "weight": 0} is context only.
    chat_template, tokenizer = template
    weighted = [dict(m) for m in CONVERSATION]
    first_answer = next(i for i, m in enumerate(weighted) if m["role"] == "assistant")
    weighted[first_answer]["weight"] = 0
    example = encode_chat(weighted, tokenizer, chat_template, max_length=10_000)
    later = [m["content"] + chat_template.end_of_turn for m in CONVERSATION[first_answer + 1:] if m["role"] == "assistant"]
    assert masked_runs(example, tokenizer) == later
    assert example["input_ids"] == encode_chat(CONVERSATION, tokenizer, chat_template, 10_000)["input_ids"]


# Qwen3's own chat template (tokenizer_config.json of Qwen/Qwen3-0.6B, Apache-2.0), verbatim: with thinking off it cues
# each answer with an empty <think></think> block but writes the block only before the last answer, so an earlier
# answer renders differently once later turns follow.
QWEN3_JINJA = (Path(__file__).parents[1] / "assets" / "qwen3_chat_template.jinja").read_text(encoding="utf-8")


@pytest.fixture
def qwen3(tokenizer):
    tokenizer = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    tokenizer.chat_template = QWEN3_JINJA
    return get_template("auto", tokenizer), tokenizer


def test_a_template_with_a_thinking_switch_is_trained_and_prompted_with_thinking_off(qwen3):
    template, tokenizer = qwen3
    example = encode_chat(CONVERSATION, tokenizer, template, max_length=10_000)
    answers = [m["content"] for m in CONVERSATION if m["role"] == "assistant"]
    assert masked_runs(example, tokenizer) == [answer + "<|im_end|>" for answer in answers]
    assert template(CONVERSATION[:2], add_generation_prompt=True).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    # Exported, the template renders the same bytes with no switch passed, as transformers and vLLM call it.
    for cut in (2, 4):
        assert tokenizer.apply_chat_template(CONVERSATION[:cut], chat_template=template.jinja, tokenize=False,
                                             add_generation_prompt=True) == template(CONVERSATION[:cut], True)


def test_an_answer_that_begins_as_the_cue_goes_on_is_masked_whole(qwen3):
    template, tokenizer = qwen3
    markup = [*CONVERSATION[:2], {"role": "assistant", "content": "<b>青い</b>光だよ。"}, *CONVERSATION[3:]]
    example = encode_chat(markup, tokenizer, template, max_length=10_000)
    assert masked_runs(example, tokenizer)[0] == "<b>青い</b>光だよ。<|im_end|>"


def test_an_answer_the_template_rewrites_is_refused_with_the_reason(qwen3):
    template, tokenizer = qwen3
    reasoning = [*CONVERSATION[:2], {"role": "assistant", "content": "<think>光の波長</think>青い光だよ。"},
                 *CONVERSATION[3:]]
    with pytest.raises(ConfigError, match=r"the answer '<think>光の波長</think>青い光だよ…' is not in .*rewrites it"):
        encode_chat(reasoning, tokenizer, template, max_length=10_000)
