"""A served request's own logit changes and log-probability entries (serve/steps.py), against transformers'
processors where it has them and hand-computed values where it does not."""

import math

import pytest
import torch
from transformers.generation.logits_process import MinPLogitsWarper, RepetitionPenaltyLogitsProcessor

from shitate.serve.steps import Shaping, TokenSpelling, shaped, token_logprob

STOP = [5]


def _shaped(logits, shaping, context=(), answer=(), temperature=1.0):
    mask, counts = torch.zeros(len(logits)), torch.zeros(len(logits))
    mask[list(context) + list(answer)] = 1.0
    for token in answer:
        counts[token] += 1
    return shaped(torch.tensor(logits), shaping, mask, counts, len(answer), STOP, temperature)


def test_nothing_asked_changes_nothing():
    logits = [0.5, -1.0, 2.0, 0.0, 1.0, 3.0]
    assert not Shaping().active and Shaping(min_p=0.1).active
    assert _shaped(logits, Shaping(), context=[0, 1], answer=[2, 2]).tolist() == logits


def test_the_repetition_penalty_is_transformers_over_prompt_and_answer():
    torch.manual_seed(0)
    logits = torch.randn(40) * 3
    context, answer = [1, 7, 7, 30], [2, 39, 7]
    expected = RepetitionPenaltyLogitsProcessor(1.3)(torch.tensor([context + answer]), logits[None].clone())[0]
    got = _shaped(logits.tolist(), Shaping(repetition_penalty=1.3), context=context, answer=answer)
    torch.testing.assert_close(got, expected)


def test_presence_and_frequency_penalties_count_the_answer_only_as_openai_writes_them():
    logits = [1.0, 1.0, 1.0, 1.0, 1.0, 1.0]
    # mu[j] - c[j] * frequency - (c[j] > 0) * presence, c over the answer: token 2 twice, token 3 once, 0 in the prompt
    got = _shaped(logits, Shaping(presence_penalty=0.5, frequency_penalty=0.25), context=[0], answer=[2, 3, 2])
    assert got.tolist() == [1.0, 1.0, 1.0 - 0.5 - 0.5, 1.0 - 0.5 - 0.25, 1.0, 1.0]


def test_logit_bias_min_tokens_and_ignore_eos():
    logits = [0.0, 1.0, 2.0, 3.0, 4.0, 9.0]  # 5, the stop token, is the likeliest
    assert _shaped(logits, Shaping(logit_bias=((0, 100.0), (4, -2.5)))).tolist() == [100.0, 1.0, 2.0, 3.0, 1.5, 9.0]
    short = _shaped(logits, Shaping(min_tokens=3), answer=[1, 2])
    assert short[5] == -math.inf and int(short.argmax()) == 4
    assert _shaped(logits, Shaping(min_tokens=3), answer=[1, 2, 3])[5] == 9.0  # long enough: the answer may end
    assert _shaped(logits, Shaping(ignore_eos=True), answer=[1] * 50)[5] == -math.inf


@pytest.mark.parametrize(("min_p", "temperature"), [(0.1, 1.0), (0.1, 0.5), (0.3, 1.5)])
def test_min_p_keeps_what_transformers_keeps_after_the_temperature(min_p, temperature):
    torch.manual_seed(1)
    logits = torch.randn(50) * 2
    expected = MinPLogitsWarper(min_p)(None, logits[None] / temperature)[0]
    got = _shaped(logits.tolist(), Shaping(min_p=min_p), temperature=temperature)
    assert torch.equal(torch.isinf(got), torch.isinf(expected)) and 1 < int(torch.isfinite(got).sum()) < 50
    assert _shaped(logits.tolist(), Shaping(min_p=min_p), temperature=0.0).tolist() == logits.tolist()  # greedy


def test_a_token_s_entry_is_its_log_probability_and_the_likeliest_words():
    logprobs = torch.tensor([0.1, 0.6, 0.3]).log()
    entry = token_logprob(logprobs, 2, alternatives=2)
    assert entry.token_id == 2 and entry.logprob == pytest.approx(math.log(0.3))
    assert [t for t, _ in entry.top] == [1, 2] and entry.top[0][1] == pytest.approx(math.log(0.6))
    assert token_logprob(logprobs, 0, alternatives=0).top == ()


def test_tokens_are_spelled_as_their_bytes_byte_level_or_byte_fallback(tokenizer):
    from tokenizers import Tokenizer, decoders, models, normalizers
    from transformers import PreTrainedTokenizerFast

    text = "なんで空は青い hello 𠮷"
    byte_level = TokenSpelling(tokenizer)  # the tests' GPT-2-like byte-level BPE: a character split across tokens
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert b"".join(byte_level.bytes_of(i) for i in ids).decode() == text
    assert any(byte_level.text_of(i).endswith("\ufffd") for i in ids)
    # SentencePiece-style byte fallback, as Gemma's: 青 is not in the vocabulary and is written as three byte tokens
    pieces = [("<unk>", 0.0), ("<bos>", 0.0), ("▁hello", -1.0), ("空", -1.0), ("▁", -2.0)]
    backend = Tokenizer(models.Unigram(pieces + [(f"<0x{b:02X}>", -5.0) for b in range(256)], unk_id=0,
                                       byte_fallback=True))
    backend.normalizer = normalizers.Replace(" ", "▁")
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    fallback = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<bos>", unk_token="<unk>")
    spelling = TokenSpelling(fallback)
    ids = fallback("空 hello 青", add_special_tokens=False)["input_ids"]
    assert [spelling.bytes_of(i) for i in ids] == [b"\xe7\xa9\xba", b" hello", b" ", b"\xe9", b"\x9d", b"\x92"]
    assert spelling.text_of(fallback.bos_token_id) == "<bos>"


def test_json_mode_draws_only_among_words_the_filters_left(tokenizer):
    from shitate.serve.steps import AnswerSteps

    spelling = TokenSpelling(tokenizer)
    brace = tokenizer.convert_tokens_to_ids("{")
    logits = torch.zeros(len(tokenizer))
    logits[brace] = -5.0  # "{" is the only word that can begin the object, and an unlikely one
    steps = AnswerSteps([1, 2], Shaping(), None, True, None, 1.0, 50, len(tokenizer), [0], spelling)
    assert int(torch.isfinite(steps.shape(logits)).sum()) == 1 and steps.shape(logits)[brace] == -5.0
    ruled_out = AnswerSteps([1, 2], Shaping(logit_bias=((brace, -math.inf),)), None, True, None, 1.0, 50,
                            len(tokenizer), [0], spelling)
    with pytest.raises(RuntimeError, match="no word of the vocabulary continues the JSON answer"):
        ruled_out.shape(logits)  # the bias ruled "{" out: nothing is left, rather than a word ruled out drawn


def test_character_offsets_are_those_of_decoding_each_prefix(tokenizer):
    # the text_offset of an echoed prompt was a decode of every prefix (0.5 s for 1,800 tokens); counted from the
    # tokens' bytes as they come, it must give the same numbers, a character split over byte tokens included
    text = "なんで空は青いの? hello 𠮷 夕焼けは赤い"
    ids = [tokenizer.bos_token_id or 0, *tokenizer(text, add_special_tokens=False)["input_ids"]]
    count = TokenSpelling(tokenizer).characters()
    expected = [len(tokenizer.decode(ids[:i], skip_special_tokens=True).rstrip("\ufffd")) for i in range(len(ids))]
    assert [count.offset_then_add(token) for token in ids] == expected
    assert count.characters == len(text)
