"""`shitate serve` over real HTTP on loopback, driven by the official `openai` client, on a tiny Gemma 3."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")

QUESTIONS = ["なんで空は青いの?", "海はなぜしょっぱいの?", "雨はどこから来るの?", "虹はなぜできるの?", "夜はなぜ暗いの?",
             "風はなぜふくの?", "雪はなぜ白いの?", "月はなぜ光るの?"]
KEY = "test-key-123"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def serving(models: list[str]):
    """`shitate serve MODELS…` behind an API key, in a uvicorn thread: its URL and engines."""
    import torch
    import uvicorn

    from shitate.serve.engine import open_engines
    from shitate.serve.server import create_app

    # fp32: greedy answers of a random tiny model have near-ties that bf16 rounding resolves differently in a
    # batch of eight than alone.
    engines = open_engines(models, dtype=torch.float32)
    port = _free_port()
    config = uvicorn.Config(create_app(engines, api_key=KEY), host="127.0.0.1", port=port, log_level="warning")
    uv = uvicorn.Server(config)
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    for _ in range(100):
        if uv.started:
            break
        time.sleep(0.1)
    try:
        yield {"url": f"http://127.0.0.1:{port}", "engines": engines}
    finally:
        uv.should_exit = True
        thread.join(timeout=10)
        for engine in engines.values():
            engine.close()


@pytest.fixture(scope="module")
def server(tiny_model):
    """Two names for the tiny model."""
    with serving([f"tiny={tiny_model}", f"other={tiny_model}"]) as served:
        yield served


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server["url"] + "/v1", api_key=KEY, max_retries=0)


def _post(url: str, body: dict | bytes, headers: dict | None = None) -> tuple[int, dict]:
    """A raw request (stdlib only), for what the openai client would refuse to send."""
    import urllib.error
    import urllib.request

    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def _reference_answers(tiny_model, questions: list[str], max_tokens: int, **settings) -> list[str]:
    """Greedy answers from transformers' generate, one request at a time: what the batcher must reproduce."""
    import torch

    from shitate.config import GenerateSpec
    from shitate.models.inference import answer, load_for_inference

    loaded = load_for_inference(str(tiny_model), dtype=torch.float32)
    return answer(loaded, [[{"role": "user", "content": q}] for q in questions],
                  GenerateSpec(max_new_tokens=max_tokens, temperature=0.0, batch_size=1, **settings))


def test_concurrent_greedy_chats_match_one_at_a_time_generation(server, client, tiny_model):
    def ask(question: str):
        return client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": question}],
                                              temperature=0, max_tokens=12)

    with ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(ask, QUESTIONS))
    expected = _reference_answers(tiny_model, QUESTIONS, 12)
    assert [r.choices[0].message.content.strip() for r in replies] == expected
    for reply in replies:
        assert reply.choices[0].finish_reason in ("stop", "length") and reply.model == "tiny"
        assert reply.usage.completion_tokens <= 12 and reply.usage.prompt_tokens > 5
    assert not server["engines"]["tiny"].active


def test_a_soft_capped_model_is_served_as_it_generates(tmp_path, tokenizer):
    # Gemma 2 (gemma-2-2b-jpn-it) soft-caps its attention scores; transformers' batcher left the cap out, and the
    # served greedy answers differed from one-at-a-time generation.
    from tiny_families import build_tiny

    model = build_tiny("gemma2", tmp_path / "gemma2", tokenizer)
    with serving([f"g2={model}"]) as served:
        client = openai.OpenAI(base_url=served["url"] + "/v1", api_key=KEY, max_retries=0)
        replies = [client.chat.completions.create(model="g2", messages=[{"role": "user", "content": q}], temperature=0,
                                                  max_tokens=12) for q in QUESTIONS[:4]]
    assert [r.choices[0].message.content.strip() for r in replies] == _reference_answers(model, QUESTIONS[:4], 12)


def test_streaming_gives_the_same_text_in_pieces(client):
    question = [{"role": "user", "content": QUESTIONS[0]}]
    whole = client.chat.completions.create(model="tiny", messages=question, temperature=0, max_tokens=16)
    pieces, reasons = [], []
    for chunk in client.chat.completions.create(model="tiny", messages=question, temperature=0, max_tokens=16,
                                                stream=True):
        pieces.append(chunk.choices[0].delta.content or "")
        reasons.append(chunk.choices[0].finish_reason)
    assert "".join(pieces) == whole.choices[0].message.content
    assert len([p for p in pieces if p]) > 1 and reasons[-1] == whole.choices[0].finish_reason


def test_n_max_tokens_stop_and_completions(client):
    reply = client.chat.completions.create(model="other", messages=[{"role": "user", "content": QUESTIONS[1]}],
                                           n=3, temperature=1.0, top_p=0.9, max_tokens=3, seed=7)
    assert [c.index for c in reply.choices] == [0, 1, 2]
    assert all(c.finish_reason == "length" for c in reply.choices) and reply.usage.completion_tokens == 9
    greedy = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": QUESTIONS[2]}],
                                            temperature=0, max_tokens=12).choices[0].message.content
    stop = greedy.strip()[2:4]
    cut = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": QUESTIONS[2]}],
                                         temperature=0, max_tokens=12, stop=[stop]).choices[0]
    assert cut.finish_reason == "stop" and cut.message.content == greedy[:greedy.index(stop)]
    completion = client.completions.create(model="tiny", prompt=["空は", "海は"], temperature=0, max_tokens=5)
    assert len(completion.choices) == 2 and all(c.text for c in completion.choices)
    assert {m.id for m in client.models.list().data} == {"tiny", "other"}


def test_a_seeded_sampled_answer_is_the_same_alone_and_amid_other_requests(server, client):
    def ask(seed: int | None, question: str = QUESTIONS[3]) -> str:
        return client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": question}],
                                              temperature=1.0, top_p=0.95, max_tokens=12, seed=seed).choices[0].message.content

    alone = ask(11)
    with ThreadPoolExecutor(8) as pool:  # six unseeded sampled requests share the batcher while seed 11 runs again
        others = [pool.submit(ask, None, q) for q in QUESTIONS[:6]]
        again = pool.submit(ask, 11)
        assert again.result() == alone and all(o.result() is not None for o in others)
    assert {ask(seed) for seed in (12, 13, 14)} != {alone}  # the seed is what chose the answer
    with ThreadPoolExecutor(8) as pool:  # the greedy and the sampled batcher running together...
        list(pool.map(lambda i: client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": QUESTIONS[i % 8]}], max_tokens=12,
            temperature=0 if i % 2 else 1.0), range(8)))
    assert ask(11) == alone  # ...left the model's configuration non-causal for a forward of its own
    streamed = "".join(chunk.choices[0].delta.content or "" for chunk in client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": QUESTIONS[3]}], temperature=1.0, top_p=0.95, max_tokens=12,
        seed=11, stream=True))
    assert streamed == alone
    assert not server["engines"]["tiny"].active


def test_sampled_answers_keep_the_model_s_own_top_k_as_generate_does(tmp_path, tiny_model):
    # The batcher sampled with transformers' default top-k of 50 whatever the model's generation settings said, and
    # a seeded answer over the whole vocabulary; `generate` and `chat` keep the model's top-k. With a top-k of 1 every
    # sampled answer is the greedy one.
    import shutil

    top_1 = shutil.copytree(tiny_model, tmp_path / "top-1")
    (top_1 / "generation_config.json").write_text(json.dumps({"do_sample": True, "top_k": 1}), encoding="utf-8")
    with serving([f"top1={top_1}"]) as served:
        client = openai.OpenAI(base_url=served["url"] + "/v1", api_key=KEY, max_retries=0)

        def ask(question: str, **settings) -> str:
            return client.chat.completions.create(model="top1", messages=[{"role": "user", "content": question}],
                                                  max_tokens=8, **settings).choices[0].message.content

        greedy = [ask(q, temperature=0) for q in QUESTIONS[:4]]
        with ThreadPoolExecutor(4) as pool:
            sampled = list(pool.map(lambda q: ask(q, temperature=1.3, top_p=0.95), QUESTIONS[:4]))
        assert sampled == greedy
        assert ask(QUESTIONS[0], temperature=1.3, seed=3) == greedy[0]
        # the draw among the top k replaced transformers' sorts of the whole vocabulary (a transformers release laid
        # out otherwise would keep them: this says so)
        lane = served["engines"]["top1"]._lanes[True]
        assert [type(p).__name__ for p in lane.manager.logit_processor.logits_processor] == [
            "ShapeRows", "ContinuousBatchingTemperatureLogitsWarper", "NoteTopK", "DrawAmongTopK", "NoteDrawn"]
        assert lane.takes_slots  # requests with steps of their own are shaped in the batch
        assert lane.manager.generation_config.do_sample is False


def test_a_request_s_own_top_k_is_drawn_among(client):
    # vLLM's and llama.cpp's top_k: with 1, a sampled answer is the greedy one, in the batcher beside other requests
    # and seeded; -1 (every word) samples, so the seeds give different answers.
    def ask(question: str, **settings) -> str:
        return client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": question}],
                                              max_tokens=8, **settings).choices[0].message.content

    greedy = [ask(q, temperature=0) for q in QUESTIONS[:4]]
    with ThreadPoolExecutor(8) as pool:
        top_1 = pool.map(lambda q: ask(q, temperature=1.5, extra_body={"top_k": 1}), QUESTIONS[:4])
        wide = [pool.submit(ask, q, temperature=1.5) for q in QUESTIONS[:4]]  # the model's top-k, in the same steps
        assert list(top_1) == greedy
        for answer in wide:
            answer.result()  # raises if a request beside them failed
    assert ask(QUESTIONS[0], temperature=1.5, seed=4, extra_body={"top_k": 1}) == greedy[0]
    every_word = {ask(QUESTIONS[0], temperature=1.5, seed=seed, extra_body={"top_k": -1}) for seed in range(4)}
    assert len(every_word) > 1
    with pytest.raises(openai.BadRequestError, match="top_k"):
        ask(QUESTIONS[0], temperature=1.0, extra_body={"top_k": -2})


def test_nucleus_sampling_keeps_the_smallest_set_that_reaches_top_p():
    import math
    from collections import Counter

    import torch

    from shitate.serve.engine import draw_token

    logits = torch.tensor([math.log(0.5), math.log(0.3), math.log(0.2)])
    generator = torch.Generator().manual_seed(0)
    assert {draw_token(logits, 1.0, 0.5, generator) for _ in range(200)} == {0}
    drawn = Counter(draw_token(logits, 1.0, 0.6, generator) for _ in range(4000))
    assert set(drawn) == {0, 1} and abs(drawn[0] / 4000 - 0.5 / 0.8) < 0.03
    drawn = Counter(draw_token(logits, 1.0, 1.0, generator) for _ in range(4000))
    assert abs(drawn[2] / 4000 - 0.2) < 0.03
    cold = Counter(draw_token(logits, 0.1, 1.0, generator) for _ in range(500))  # a low temperature sharpens
    assert cold[0] > 490
    first = [draw_token(logits, 1.0, 1.0, torch.Generator().manual_seed(5)) for _ in range(3)]
    assert len(set(first)) == 1  # the same generator state, the same draw


def test_bad_requests_get_openai_shaped_errors(server, client):
    with pytest.raises(openai.NotFoundError, match="'nope' is not served here"):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "a"}])
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "a"}], max_tokens=-1)
    with pytest.raises(openai.BadRequestError, match="context_length_exceeded|reads at most"):
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "空" * 3000}])
    headers = {"Authorization": f"Bearer {KEY}"}
    url = server["url"] + "/v1/chat/completions"
    status, reply = _post(url, {"model": "tiny", "messages": "hello"}, headers)
    assert status == 400 and reply["error"]["param"] == "messages" and reply["error"]["type"] == "invalid_request_error"
    status, reply = _post(url, b'{"model": "tiny", "messages": [{"role": "user", "content": "\xff\xfe"}]}', headers)
    assert status == 400 and "UTF-8" in reply["error"]["message"]


def test_content_parts_and_the_developer_role_read_as_their_plain_forms(client):
    """Clients built for newer OpenAI models send content as a list of parts and the system message as "developer"."""
    def greedy(messages):
        reply = client.chat.completions.create(model="tiny", messages=messages, max_tokens=6, temperature=0)
        return reply.choices[0].message.content

    plain = greedy([{"role": "system", "content": "やさしく"}, {"role": "user", "content": "なんで空は青いの?\nおしえて"}])
    parts = greedy([{"role": "developer", "content": [{"type": "text", "text": "やさしく"}]},
                    {"role": "user", "content": [{"type": "text", "text": "なんで空は青いの?"},
                                                 {"type": "text", "text": "おしえて"}]}])
    assert parts == plain
    from shitate.serve.server import Message, _chat_messages

    assert _chat_messages([Message(role="developer", content=[{"type": "text", "text": "やさしく"}])]) == [
        {"role": "system", "content": "やさしく"}]
    with pytest.raises(openai.BadRequestError, match="messages.0.content.1 is a 'image_url' part.*text only"):
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": [
            {"type": "text", "text": "これは何?"}, {"type": "image_url", "image_url": {"url": "data:image/png;base64,AA=="}}]}])
    with pytest.raises(openai.BadRequestError, match="messages.0.content.0.text: a text part needs its text"):
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": [{"type": "text"}]}])


@pytest.mark.parametrize("setting", [{"response_format": {"type": "grammar", "grammar": "root ::= \"a\""}},
                                     {"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]},
                                     # other servers' extensions, sent through the SDK's extra_body
                                     {"extra_body": {"typical_p": 0.9}}, {"extra_body": {"use_beam_search": True}},
                                     {"extra_body": {"guided_choice": ["a"]}}])
def test_a_setting_the_server_does_not_honour_is_refused_not_ignored(client, setting):
    name = next(iter(setting.get("extra_body", setting)))
    with pytest.raises(openai.BadRequestError, match=f"{name} is not supported") as refused:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "a"}], max_tokens=2, **setting)
    assert refused.value.body["code"] == "unsupported_parameter" and refused.value.body["param"] == name


def test_settings_a_client_sends_by_default_are_accepted(server, client):
    reply = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "a"}], max_tokens=2,
                                           logprobs=False, frequency_penalty=0, presence_penalty=0, logit_bias={},
                                           response_format={"type": "text"}, tool_choice="none",
                                           tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}],
                                           extra_body={"min_p": 0, "repetition_penalty": 1.0, "user_tag": "x"})
    assert reply.choices[0].finish_reason in ("stop", "length") and reply.choices[0].logprobs is None
    assert not server["engines"]["tiny"].active


def test_penalties_bias_and_length_settings_shape_the_answer(server, client, tiny_model):
    def ask(question: str = QUESTIONS[0], **settings):
        return client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": question}],
                                              temperature=0, max_tokens=10, **settings).choices[0]

    # the repetition penalty as generate applies it (shitate compare and eval with generate.repetition_penalty)
    with ThreadPoolExecutor(4) as pool:
        penalised = list(pool.map(lambda q: ask(q, extra_body={"repetition_penalty": 1.5}).message.content,
                                  QUESTIONS[:4]))
    assert penalised == _reference_answers(tiny_model, QUESTIONS[:4], 10, repetition_penalty=1.5)
    assert penalised != [ask(q).message.content for q in QUESTIONS[:4]]
    tokenizer = server["engines"]["tiny"].loaded.tokenizer
    plain = tokenizer(ask().message.content, add_special_tokens=False)["input_ids"]
    assert max(plain.count(t) for t in plain) >= 5  # the tiny model repeats itself greedily...
    freer = tokenizer(ask(frequency_penalty=2.0).message.content, add_special_tokens=False)["input_ids"]
    assert max(freer.count(t) for t in freer) < max(plain.count(t) for t in plain)  # ...and less so when penalised
    word = tokenizer("空", add_special_tokens=False)["input_ids"][0]
    assert ask(logit_bias={str(word): 100}).message.content == "空" * 10
    end_now = {str(server["engines"]["tiny"].stop_ids[0]): 100}  # the end of the turn made the likeliest word
    assert (ask(logit_bias=end_now).message.content, ask(logit_bias=end_now).finish_reason) == ("", "stop")
    reply = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": QUESTIONS[0]}],
                                           temperature=0, max_tokens=10, logit_bias=end_now,
                                           extra_body={"min_tokens": 4})
    assert reply.usage.completion_tokens == 5 and reply.choices[0].finish_reason == "stop"  # 4 words, then the end
    reply = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": QUESTIONS[0]}],
                                           temperature=0.8, max_tokens=10, logit_bias=end_now,
                                           extra_body={"ignore_eos": True, "min_p": 0.05})
    assert reply.usage.completion_tokens == 10 and reply.choices[0].finish_reason == "length"
    with pytest.raises(openai.BadRequestError, match="logit_bias: '99999' is not a token id"):
        ask(logit_bias={"99999": 1})
    assert not server["engines"]["tiny"].active


def test_json_mode_answers_with_one_json_object(server, client):
    from shitate.serve.json_mode import JsonPrefix

    def ask(question: str, **settings):
        return client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": question}],
                                              max_tokens=40, response_format={"type": "json_object"}, **settings)

    with pytest.raises(json.JSONDecodeError):  # a random model's plain answer is not JSON...
        json.loads(client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": QUESTIONS[0]}],
                                                  max_tokens=40, temperature=0).choices[0].message.content)
    endings = []
    for question in QUESTIONS[:4]:
        for settings in ({"temperature": 0}, {"temperature": 1.0, "seed": 3}):
            choice = ask(question, **settings).choices[0]
            endings.append(choice.finish_reason)
            if choice.finish_reason == "stop":  # ...and in JSON mode an answer that ends is one object
                assert isinstance(json.loads(choice.message.content), dict)
            else:  # cut off by max_tokens: the beginning of one
                assert JsonPrefix().feed(choice.message.content.encode())
    assert "stop" in endings
    streamed = "".join(chunk.choices[0].delta.content or "" for chunk in client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": QUESTIONS[3]}], max_tokens=40, temperature=1.0, seed=3,
        response_format={"type": "json_object"}, stream=True))
    assert streamed == ask(QUESTIONS[3], temperature=1.0, seed=3).choices[0].message.content
    assert not server["engines"]["tiny"].active


def test_steps_of_their_own_shape_the_same_answers_in_the_batch_as_alone(server, client):
    # in the batch, our processors find each request's steps by the slot it carries; where a batcher takes no slots
    # (a transformers release laid out otherwise) the request is decoded alone: both give the same answers
    settings = [{"extra_body": {"repetition_penalty": 1.5}}, {"frequency_penalty": 1.0, "presence_penalty": 0.5},
                {"response_format": {"type": "json_object"}}, {"logprobs": True, "top_logprobs": 2}]

    def ask(question: str, setting: dict):
        reply = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": question}],
                                               temperature=0, max_tokens=12, **setting).choices[0]
        logprobs = [(e.token, round(e.logprob, 4)) for e in reply.logprobs.content] if reply.logprobs else None
        return reply.message.content, logprobs

    asked = [(q, setting) for q in QUESTIONS[:3] for setting in settings]
    with ThreadPoolExecutor(6) as pool:  # side by side in the batch, beside plain requests
        plain = [pool.submit(ask, q, {}) for q in QUESTIONS[3:6]]
        batched = list(pool.map(lambda a: ask(*a), asked))
        for answer in plain:
            answer.result()
    lane = server["engines"]["tiny"]._lanes[True]
    lane.takes_slots = False
    try:
        alone = [ask(*a) for a in asked]
    finally:
        lane.takes_slots = True
    assert batched == alone
    assert not server["engines"]["tiny"]._answer_steps and not server["engines"]["tiny"].active


def test_a_request_whose_steps_fail_in_the_batcher_fails_alone(server, client, monkeypatch):
    from shitate.serve.steps import AnswerSteps

    shape = AnswerSteps.shape

    def failing(self, logits):
        if self.logprobs == 7:  # the one request that asks for seven alternatives
            raise ValueError("a shaping bug")
        return shape(self, logits)

    monkeypatch.setattr(AnswerSteps, "shape", failing)

    def ask(alternatives: int):
        return client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": QUESTIONS[0]}],
                                              temperature=0, max_tokens=8, logprobs=True, top_logprobs=alternatives)

    with ThreadPoolExecutor(3) as pool:
        others = [pool.submit(ask, 2) for _ in range(2)]
        with pytest.raises(openai.InternalServerError):
            pool.submit(ask, 7).result()
        assert all(len(o.result().choices[0].logprobs.content) >= 1 for o in others)  # answered beside it
    assert ask(2).choices[0].finish_reason in ("stop", "length")  # the batcher goes on
    assert not server["engines"]["tiny"]._answer_steps and not server["engines"]["tiny"].active


def test_stop_token_ids_end_the_answer_at_those_words(server, client):
    engine = server["engines"]["tiny"]
    tokenizer = engine.loaded.tokenizer
    by_bytes = {engine.spelling.bytes_of(i): i for i in range(len(tokenizer))}  # a byte-level BPE: one id a spelling

    def ask(**settings):
        return client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": QUESTIONS[1]}],
                                              max_tokens=12, **settings).choices[0]

    for settings in ({"temperature": 0}, {"temperature": 1.0, "seed": 5}):  # in the batch, and decoded alone
        answer = ask(**settings, logprobs=True)
        tokens = [by_bytes[bytes(entry.bytes)] for entry in answer.logprobs.content]
        cut = next(i for i, t in enumerate(tokens) if i > 0 and t not in tokens[:i])  # a word not seen before it
        ended = ask(**settings, extra_body={"stop_token_ids": [tokens[cut]]})
        assert (ended.message.content, ended.finish_reason) == (tokenizer.decode(tokens[:cut]), "stop")
    with pytest.raises(openai.BadRequestError, match="stop_token_ids: -1 is not a token id"):
        ask(extra_body={"stop_token_ids": [-1]})


def test_structured_outputs_answer_with_an_object_that_fits_the_schema(server, client):
    from shitate.serve.json_mode import JsonPrefix

    schema = {"type": "object", "properties": {"kind": {"enum": ["why", "how"]}, "n": {"type": "integer"}},
              "required": ["kind", "n"], "additionalProperties": False}
    response_format = {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema, "strict": True}}

    def ask(question: str, **settings):
        return client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": question}],
                                              max_tokens=60, response_format=response_format, **settings).choices[0]

    endings = []
    for question in QUESTIONS[:4]:
        for settings in ({"temperature": 0}, {"temperature": 1.0, "seed": 3}):  # in the batch, and alone
            choice = ask(question, **settings)
            endings.append(choice.finish_reason)
            if choice.finish_reason == "stop":
                answer = json.loads(choice.message.content)
                assert set(answer) == {"kind", "n"} and answer["kind"] in ("why", "how") and type(answer["n"]) is int
            else:
                assert JsonPrefix(schema).feed(choice.message.content.encode())
    assert endings.count("stop") >= 2
    for bad, message in (({"type": "array", "items": {}}, "give a schema of type object"),
                         (None, "give it as response_format.json_schema.schema")):
        with pytest.raises(openai.BadRequestError, match=message):
            client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "a"}], max_tokens=4,
                                           response_format={"type": "json_schema",
                                                            "json_schema": {"name": "x", "schema": bad}})
    assert not server["engines"]["tiny"].active


def _reference_logprobs(tiny_model, ids: list[int]):
    """log-softmax of the model's logits at every place of `ids`, from one plain forward in fp32."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().log_softmax(-1)


def test_chat_logprobs_are_the_model_s_own_beside_the_same_greedy_answer(server, client, tiny_model):
    messages = [{"role": "user", "content": QUESTIONS[0]}]
    plain = client.chat.completions.create(model="tiny", messages=messages, temperature=0, max_tokens=10)
    reply = client.chat.completions.create(model="tiny", messages=messages, temperature=0, max_tokens=10, logprobs=True,
                                           top_logprobs=3)
    content = reply.choices[0].message.content
    assert content == plain.choices[0].message.content  # decoded alone, the same greedy answer as in the batch
    entries = reply.choices[0].logprobs.content
    assert len(entries) == reply.usage.completion_tokens == 10  # no end of turn in 10 words here: each has one
    assert b"".join(bytes(e.bytes) for e in entries).decode() == content  # byte tokens of a character rejoin
    engine = server["engines"]["tiny"]
    prompt = engine.chat_prompt(messages)
    tokens = engine.loaded.tokenizer(content, add_special_tokens=False)["input_ids"]
    reference = _reference_logprobs(tiny_model, prompt + tokens)
    for place, entry in enumerate(entries):
        expected = reference[len(prompt) - 1 + place]
        best = expected.topk(3)
        assert entry.logprob == pytest.approx(float(expected.max()), abs=1e-4)  # greedy: the likeliest word
        assert [t.logprob for t in entry.top_logprobs] == pytest.approx(best.values.tolist(), abs=1e-4)
        assert entry.top_logprobs[0].token == entry.token and entry.top_logprobs[0].bytes == entry.bytes
    streamed = [chunk.choices[0].logprobs for chunk in client.chat.completions.create(
        model="tiny", messages=messages, temperature=0, max_tokens=10, logprobs=True, top_logprobs=3, stream=True)]
    assert [e for part in streamed if part for e in part.content] == entries
    only_own = client.chat.completions.create(model="tiny", messages=messages, temperature=0, max_tokens=10,
                                              logprobs=True).choices[0].logprobs.content
    assert [e.logprob for e in only_own] == [e.logprob for e in entries] and all(not e.top_logprobs for e in only_own)
    with pytest.raises(openai.BadRequestError, match="top_logprobs: set logprobs to true"):
        client.chat.completions.create(model="tiny", messages=messages, max_tokens=2, top_logprobs=2)
    assert not engine.active


def test_completions_score_a_prompt_of_token_ids_as_an_evaluation_harness_asks(server, client, tiny_model):
    # lm-evaluation-harness's local-completions: token ids, echo, logprobs 1, max_tokens 1 (or 0), temperature 0;
    # it sums token_logprobs past the context and checks each token against the top_logprobs.
    engine = server["engines"]["tiny"]
    ids = engine.text_prompt("なんで空は青いの? 青い光が散らばるから")
    reference = _reference_logprobs(tiny_model, ids)
    reply = client.completions.create(model="tiny", prompt=ids, max_tokens=1, echo=True, logprobs=1, temperature=0)
    choice = reply.choices[0]
    scored = choice.logprobs
    assert len(scored.token_logprobs) == len(ids) + 1 and scored.token_logprobs[0] is None
    expected = [float(reference[place - 1, ids[place]]) for place in range(1, len(ids))]
    assert scored.token_logprobs[1:-1] == pytest.approx(expected, abs=1e-4)
    greedy_next = int(reference[-1].argmax())
    assert scored.token_logprobs[-1] == pytest.approx(float(reference[-1].max()), abs=1e-4)
    text = engine.loaded.tokenizer.decode(ids, skip_special_tokens=True)
    assert choice.text == text + engine.loaded.tokenizer.decode([greedy_next], skip_special_tokens=True)
    for place in range(1, len(ids)):  # the token itself is among its place's alternatives
        top = scored.top_logprobs[place]
        assert scored.tokens[place] in top and max(top.values()) == pytest.approx(float(reference[place - 1].max()),
                                                                                  abs=1e-4)
    offsets = scored.text_offset
    assert offsets == sorted(offsets) and offsets[-1] == len(text)
    nothing_new = client.completions.create(model="tiny", prompt=ids, max_tokens=0, echo=True, logprobs=0).choices[0]
    assert nothing_new.text == text and nothing_new.logprobs.token_logprobs == scored.token_logprobs[:-1]
    worded = client.completions.create(model="tiny", prompt="なんで空は青いの? 青い光が散らばるから", max_tokens=1,
                                       echo=True, logprobs=1, temperature=0).choices[0]
    assert worded.text == choice.text and worded.logprobs.token_logprobs == scored.token_logprobs  # BOS, then the text
    streamed = list(client.completions.create(model="tiny", prompt=ids, max_tokens=3, echo=True, logprobs=2,
                                              temperature=0, stream=True))
    assert streamed[0].choices[0].text == text and len(streamed[0].choices[0].logprobs.tokens) == len(ids)
    for bad, message in (({"prompt": [len(engine.loaded.tokenizer) + 5]}, "is not a token id"),
                         ({"prompt": "a", "max_tokens": 0}, "max_tokens: 0 writes nothing"),
                         ({"prompt": "空" * 3000, "max_tokens": 0, "echo": True, "logprobs": 0}, "reads at most")):
        with pytest.raises(openai.BadRequestError, match=message):
            client.completions.create(model="tiny", **{"max_tokens": 2, **bad})
    assert not engine.active


def test_a_stream_ends_with_the_usage_when_asked(client):
    messages = [{"role": "user", "content": "なんで空は青いの?"}]
    whole = client.chat.completions.create(model="tiny", messages=messages, max_tokens=7, temperature=0, n=2)
    chunks = list(client.chat.completions.create(model="tiny", messages=messages, max_tokens=7, temperature=0, n=2,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == whole.usage.model_dump()
    assert all(chunk.usage is None for chunk in chunks[:-1])
    plain = list(client.chat.completions.create(model="tiny", messages=messages, max_tokens=7, temperature=0, stream=True))
    assert all(chunk.choices for chunk in plain)  # no usage chunk unless asked
    settings = {"model": "tiny", "prompt": ["空は", "海は"], "max_tokens": 4, "temperature": 0}
    text = list(client.completions.create(**settings, stream=True, stream_options={"include_usage": True}))
    assert text[-1].usage.model_dump() == client.completions.create(**settings).usage.model_dump()


def test_a_missing_or_wrong_key_is_refused_before_anything_runs(server):
    import urllib.request

    engine = server["engines"]["tiny"]
    before = next(engine._ids)
    body = {"model": "tiny", "messages": [{"role": "user", "content": "a"}]}
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        status, reply = _post(server["url"] + "/v1/chat/completions", body, headers)
        assert status == 401 and reply["error"]["code"] == "invalid_api_key"
    assert next(engine._ids) == before + 1  # no request reached the engine
    with urllib.request.urlopen(server["url"] + "/health") as health:
        assert json.loads(health.read())["status"] == "ok"


def test_a_client_that_leaves_mid_stream_frees_its_slot(server):
    import http.client
    from urllib.parse import urlparse

    engine = server["engines"]["tiny"]
    body = {"model": "tiny", "messages": [{"role": "user", "content": QUESTIONS[3]}], "max_tokens": 400,
            "temperature": 1.0, "stream": True}
    address = urlparse(server["url"])
    connection = http.client.HTTPConnection(address.hostname, address.port, timeout=60)
    connection.request("POST", "/v1/chat/completions", json.dumps(body),
                       {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    response = connection.getresponse()
    while True:
        line = response.readline().decode()
        if line.startswith("data: ") and json.loads(line[6:])["choices"][0]["delta"].get("content"):
            break
    assert engine.active  # generating
    connection.close()  # the client goes away mid-answer
    for _ in range(50):
        if not engine.active:
            break
        time.sleep(0.1)
    assert not engine.active


def test_shitate_judge_speaks_to_the_server(server, monkeypatch):
    from shitate.errors import ShitateError
    from shitate.evals.judge import endpoint_judge

    monkeypatch.setenv("SHITATE_JUDGE_API_KEY", KEY)
    ask = endpoint_judge(server["url"] + "#tiny")
    engine = server["engines"]["tiny"]
    before = next(engine._ids)
    replies = ask(["1から5で採点してください: 空は青い。"])
    assert len(replies) == 1 and next(engine._ids) == before + 2  # answered by the served model
    with pytest.raises(ShitateError, match="serves tiny, other: name the judge"):
        endpoint_judge(server["url"])
    monkeypatch.setenv("SHITATE_JUDGE_API_KEY", "wrong")
    with pytest.raises(ShitateError, match="refused the API key"):
        endpoint_judge(server["url"] + "#tiny")


def test_a_run_is_served_with_its_recipe_s_answer_settings_repetition_penalty_included(tmp_path, tiny_model, capsys):
    # A run whose recipe sets generate.repetition_penalty answered without it (the batcher had no per-request
    # penalty): differently from `shitate compare`/`eval`.
    from test_train import make_recipe, train

    run = tmp_path / "run"
    assert train(make_recipe(tmp_path, tiny_model), run, "--set", "train.epochs=1",
                 "--set", "generate.repetition_penalty=1.5", "--set", "generate.top_p=0.8").exit_code == 0
    capsys.readouterr()
    with serving([f"kids={run}"]) as served:
        said = " ".join(capsys.readouterr().err.split())
        assert "kids: answers with the recipe's repetition penalty 1.5 unless a request sets its own" in said
        assert served["engines"]["kids"].defaults.top_p == 0.8
        client = openai.OpenAI(base_url=served["url"] + "/v1", api_key=KEY, max_retries=0)

        def ask(**settings) -> str:
            return client.chat.completions.create(model="kids", messages=[{"role": "user", "content": QUESTIONS[0]}],
                                                  temperature=0, max_tokens=16, **settings).choices[0].message.content

        default = ask()
        assert default == ask(extra_body={"repetition_penalty": 1.5}) != ask(extra_body={"repetition_penalty": 1.0})
