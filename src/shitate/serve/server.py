"""`shitate serve`: an OpenAI-compatible HTTP server (FastAPI) over one or more engines.

Routes: POST /v1/chat/completions, POST /v1/completions (both streamed over server-sent events
when `stream` is true), GET /v1/models, GET /health. Token log-probabilities (and, for completions,
the prompt's own with `echo`, as evaluation harnesses score answers), OpenAI's penalties and logit
bias, vLLM's and llama.cpp's min_p, repetition penalty, min_tokens and ignore_eos, and JSON mode are
honoured; a setting that is not is refused by name rather than ignored. Errors have OpenAI's shape
(`{"error": {"message", "type", "param", "code"}}`) so clients report them as they would
OpenAI's. With an API key every route but /health needs `Authorization: Bearer KEY`, checked
before the body is read. Prompts are never logged unless the server was started to log them.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import secrets
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from shitate.serve.engine import Engine, EngineFailed, Piece, Sampling
from shitate.serve.json_mode import schema_problem
from shitate.serve.steps import CharacterCount, Shaping, TokenLogprob

log = logging.getLogger("shitate.serve")
MAX_CHOICES = 8


# --- requests -----------------------------------------------------------------------------------------------------

class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    # "developer" is OpenAI's newer name for the system message; some clients send it.
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[dict[str, Any]]  # a string, or content parts: [{"type": "text", "text": …}, …]


class _Common(BaseModel):
    # Unknown fields (user, metadata, …) are accepted and ignored, as OpenAI-compatible servers do; the known ones
    # below, and other servers' sampling extensions (_NOT_DONE_EXTENSIONS), that would change the answer's shape or
    # sampling are refused when a request asks for them (_refuse_what_is_not_done), so a client never silently gets
    # less than it asked for.
    model_config = ConfigDict(extra="allow")
    model: str
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=-1)  # not OpenAI's, but vLLM's and llama.cpp's: 0 or -1 for every word
    max_tokens: int | None = Field(None, ge=1)
    stop: str | list[str] | None = None
    n: int = Field(1, ge=1, le=MAX_CHOICES)
    seed: int | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None  # token id (as a string) → added to its logit, -100 to 100
    # Other servers' extensions (vLLM, llama.cpp), sent through the OpenAI SDK's extra_body.
    repetition_penalty: float | None = Field(None, gt=0.0)
    repeat_penalty: float | None = Field(None, gt=0.0)  # llama.cpp's name for it
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    min_tokens: int | None = Field(None, ge=0)
    ignore_eos: bool | None = None
    stop_token_ids: list[int] | None = None


class ChatRequest(_Common):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)
    response_format: dict[str, Any] | None = None
    tools: list[Any] | None = None
    tool_choice: str | dict[str, Any] | None = None


class CompletionRequest(_Common):
    prompt: str | list[str] | list[int] | list[list[int]]  # text, or token ids as a harness sends them
    max_tokens: int | None = Field(None, ge=0)  # 0 with echo: the prompt scored, nothing written
    logprobs: int | None = Field(None, ge=0, le=20)  # how many alternatives beside each token's own
    echo: bool | None = None
    best_of: int | None = None
    suffix: str | None = None


class RequestError(Exception):
    """A request the server refuses, with OpenAI's error fields."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


# --- the app ------------------------------------------------------------------------------------------------------

def create_app(engines: dict[str, Engine], api_key: str | None = None, log_prompts: bool = False) -> Any:
    from fastapi import FastAPI
    from fastapi.responses import StreamingResponse

    app = FastAPI(title="shitate", docs_url=None, redoc_url=None, openapi_url=None)
    if api_key:
        _require_key(app, api_key)
    _answer_errors_as_openai_does(app)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "models": list(engines)}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": name, "object": "model", "created": 0, "owned_by": "shitate"}
                                           for name in engines]}

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest) -> Any:
        engine = _engine(engines, body.model)
        _refuse_what_is_not_done(body)
        messages = _chat_messages(body.messages)
        if log_prompts:
            log.info("chat %s: %s", body.model, json.dumps(messages, ensure_ascii=False))
        prompt = engine.chat_prompt(messages)
        sampling = _sampling(engine, body, body.max_completion_tokens or body.max_tokens, len(prompt))
        if body.stream:
            return StreamingResponse(_chat_stream(engine, body, prompt, sampling), media_type="text/event-stream")
        answers = await _gather(engine, prompt, sampling, body.n)
        return {"id": _id("chatcmpl"), "object": "chat.completion", "created": int(time.time()), "model": body.model,
                "choices": [{"index": i, "message": {"role": "assistant", "content": a.text},
                             "logprobs": _chat_logprobs(engine, sampling, a.logprobs),
                             "finish_reason": a.finish_reason} for i, a in enumerate(answers)],
                "usage": _usage(len(prompt), [a.completion_tokens for a in answers])}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest) -> Any:
        engine = _engine(engines, body.model)
        _refuse_what_is_not_done(body)
        prompts = _completion_prompts(engine, body.prompt)
        if log_prompts:
            log.info("completion %s: %s", body.model, json.dumps([p.text for p in prompts], ensure_ascii=False))
        if body.max_tokens == 0 and not body.echo:
            raise RequestError(400, "max_tokens: 0 writes nothing; it is for echo with logprobs (scoring the prompt). "
                                    "Ask for at least 1 token.", param="max_tokens")
        samplings: list[Sampling | None] = []
        for prompt in prompts:
            if body.max_tokens == 0:  # scored, not answered: the prompt must fit all the same
                _room(engine, body, len(prompt.ids), least=0)
                samplings.append(None)
            else:
                samplings.append(_sampling(engine, body, body.max_tokens, len(prompt.ids)))
        echoes = [await _echo(engine, body, p) for p in prompts]
        if body.stream:
            return StreamingResponse(_completion_stream(engine, body, prompts, samplings, echoes),
                                     media_type="text/event-stream")
        choices, answers = [], []
        for p, (sampling, echo) in enumerate(zip(samplings, echoes)):
            made = await _gather(engine, prompts[p].ids, sampling, body.n) if sampling else [Piece("", "length")] * body.n
            answers += made
            for i, a in enumerate(made):
                logprobs = _CompletionLogprobs(engine, echo) if body.logprobs is not None else None
                choices.append({"index": p * body.n + i, "text": echo.text + a.text, "finish_reason": a.finish_reason,
                                "logprobs": logprobs and logprobs.with_answer(a.logprobs)})
        return {"id": _id("cmpl"), "object": "text_completion", "created": int(time.time()), "model": body.model,
                "choices": choices,
                "usage": _usage(sum(len(p.ids) for p in prompts), [a.completion_tokens for a in answers])}

    return app


def _require_key(app: Any, api_key: str) -> None:
    """Every request but /health must carry `Authorization: Bearer KEY`."""
    from fastapi import Request
    from fastapi.responses import JSONResponse

    @app.middleware("http")
    async def require_key(request: Request, call_next: Any) -> Any:
        if request.url.path != "/health":
            given = request.headers.get("authorization", "")
            scheme, _, token = given.partition(" ")
            if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(), api_key.encode()):
                error = RequestError(401, "missing or wrong API key: send Authorization: Bearer KEY "
                                          "(the key given to shitate serve)", code="invalid_api_key",
                                     kind="authentication_error")
                return JSONResponse(error.body(), status_code=401)
        return await call_next(request)


def _answer_errors_as_openai_does(app: Any) -> None:
    """Refusals (ours, FastAPI's and the engine's) as OpenAI's error body, so clients show the message."""
    from fastapi import Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    @app.exception_handler(RequestError)
    async def refused(request: Request, error: RequestError) -> Any:
        return JSONResponse(error.body(), status_code=error.status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> Any:
        # FastAPI's own refusals (a body it cannot decode, an unknown route) in OpenAI's shape.
        message = str(error.detail)
        if error.status_code == 400 and "parsing the body" in message:
            message = "the request body is not valid JSON in UTF-8"
        return JSONResponse(RequestError(error.status_code, message).body(), status_code=error.status_code)

    @app.exception_handler(EngineFailed)
    async def failed(request: Request, error: EngineFailed) -> Any:
        return JSONResponse(RequestError(503, str(error), kind="server_error").body(), status_code=503)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, error: RequestValidationError) -> Any:
        first = error.errors()[0]
        where = ".".join(str(part) for part in first.get("loc", ()) if part != "body")
        message = f"{where}: {first.get('msg')}" if where else str(first.get("msg"))
        if first.get("type") == "json_invalid":
            message = "the request body is not valid JSON in UTF-8"
        return JSONResponse(RequestError(400, message, param=where or None).body(), status_code=400)


def _engine(engines: dict[str, Engine], name: str) -> Engine:
    if name not in engines:
        if len(engines) == 1 and name in ("", "default"):
            return next(iter(engines.values()))
        raise RequestError(404, f"model {name!r} is not served here; GET /v1/models lists: {', '.join(engines)}",
                           param="model", code="model_not_found")
    return engines[name]


def _chat_messages(messages: list[Message]) -> list[dict[str, str]]:
    """The conversation as the template reads it: text content, the developer message as the system one."""
    plain = []
    for i, message in enumerate(messages):
        content = message.content
        if not isinstance(content, str):
            for j, part in enumerate(content):
                if part.get("type") != "text":
                    raise RequestError(400, f"messages.{i}.content.{j} is a {part.get('type')!r} part; the models "
                                            "served here read text only: send {\"type\": \"text\", \"text\": …} "
                                            "parts or a string.", param=f"messages.{i}.content.{j}")
                if not isinstance(part.get("text"), str):
                    raise RequestError(400, f"messages.{i}.content.{j}.text: a text part needs its text as a string",
                                       param=f"messages.{i}.content.{j}.text")
            content = "\n".join(part["text"] for part in content)  # as vLLM joins text parts
        plain.append({"role": "system" if message.role == "developer" else message.role, "content": content})
    return plain


_NOT_DONE = {
    "response_format": "the answer can be text, json_object or json_schema",
    "tools": "the models served here are not given tools; send no tools, or tool_choice \"none\"",
    "best_of": "each choice is one answer; ask for n of them",
    "suffix": "there is no fill-in-the-middle here",
}


# Sampling settings other OpenAI-compatible servers (vLLM, llama.cpp, SGLang) take beyond OpenAI's, each with the value
# that leaves the answer as it is: a client sending one (through the OpenAI SDK's extra_body) expects it applied.
_NOT_DONE_EXTENSIONS: dict[str, tuple[Any, ...]] = {
    "typical_p": (None, 1, 1.0), "use_beam_search": (None, False), "guided_json": (None,),
    "guided_regex": (None,), "guided_choice": (None,), "guided_grammar": (None,), "grammar": (None, ""),
    "json_schema": (None,),
}


def _refuse_what_is_not_done(body: _Common) -> None:
    """A 400 naming the first setting that asks for something this server does not do: an answer without it
    would look like success and quietly be less than what the client asked for."""
    for name, value in (body.model_extra or {}).items():
        if name in _NOT_DONE_EXTENSIONS and value not in _NOT_DONE_EXTENSIONS[name]:
            why = ("the constraints here are response_format's json_object and json_schema, not a grammar, regex or "
                   "choice list" if name.startswith(("guided_", "grammar", "json_schema"))
                   else "sampling here takes temperature, top_p, top_k, min_p, the penalties, seed and stop")
            raise RequestError(400, f"{name} is not supported by shitate serve: {why}. Leave it out.", param=name,
                               code="unsupported_parameter")

    def given(name: str) -> Any:  # chat and completion requests each have their own of these settings
        return getattr(body, name, None)

    asked = {
        "response_format": (given("response_format") or {"type": "text"}).get("type") not in ("text", "json_object",
                                                                                             "json_schema"),
        "tools": bool(given("tools")) and given("tool_choice") != "none",
        "best_of": given("best_of") not in (None, 1, body.n),
        "suffix": bool(given("suffix")),
    }
    for name, wanted in asked.items():
        if wanted:
            raise RequestError(400, f"{name} is not supported by shitate serve: {_NOT_DONE[name]}. Leave it out.",
                               param=name, code="unsupported_parameter")


def _sampling(engine: Engine, body: _Common, max_tokens: int | None, prompt_tokens: int) -> Sampling:
    defaults = engine.defaults
    wanted = max_tokens or defaults.max_new_tokens
    room = _room(engine, body, prompt_tokens)
    if max_tokens is not None and max_tokens > room:
        raise RequestError(400, f"max_tokens {max_tokens} does not fit: the prompt takes {prompt_tokens} of "
                                f"{body.model}'s {engine.context_length} tokens, so at most {room} can follow.",
                           param="max_tokens", code="context_length_exceeded")
    stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if len(stops) > 4 or any(not s for s in stops):
        raise RequestError(400, "stop: up to 4 non-empty strings", param="stop")
    return Sampling(max_tokens=min(wanted, room),
                    temperature=defaults.temperature if body.temperature is None else body.temperature,
                    top_p=defaults.top_p if body.top_p is None else body.top_p,
                    top_k=None if body.top_k is None else max(body.top_k, 0), stop=tuple(stops), seed=body.seed,
                    logprobs=_logprobs_asked(body), shaping=_shaping(engine, body),
                    stop_token_ids=tuple(_token_ids(engine, body, "stop_token_ids", body.stop_token_ids or [])),
                    **_json_answer(getattr(body, "response_format", None) or {}))


def _json_answer(response_format: dict[str, Any]) -> dict[str, Any]:
    """Sampling's JSON settings for a response_format: JSON mode, or a schema the object must fit."""
    kind = response_format.get("type")
    if kind == "json_object":
        return {"json_object": True}
    if kind != "json_schema":
        return {}
    schema = (response_format.get("json_schema") or {}).get("schema")
    problem = schema_problem(schema) if schema is not None else "give it as response_format.json_schema.schema"
    if problem:
        raise RequestError(400, f"response_format: the JSON schema cannot be followed here: {problem}.",
                           param="response_format")
    return {"json_object": True, "json_schema": schema}


def _room(engine: Engine, body: _Common, prompt_tokens: int, least: int = 1) -> int:
    """How many tokens can follow the prompt; refused where fewer than `least` can (0: a prompt only scored)."""
    room = engine.context_length - prompt_tokens
    if room < least:
        param = "messages" if isinstance(body, ChatRequest) else "prompt"
        raise RequestError(400, f"the prompt is {prompt_tokens} tokens; {body.model} reads at most "
                                f"{engine.context_length}. Shorten the {'conversation' if param == 'messages' else param}.",
                           param=param, code="context_length_exceeded")
    return room


def _logprobs_asked(body: _Common) -> int | None:
    """How many alternatives beside each token's own log-probability the request asks for; None: no log-probabilities."""
    if isinstance(body, ChatRequest):
        if body.top_logprobs and not body.logprobs:  # 0 alone, as some clients send it, asks for nothing
            raise RequestError(400, "top_logprobs: set logprobs to true as well", param="top_logprobs")
        return (body.top_logprobs or 0) if body.logprobs else None
    return getattr(body, "logprobs", None)


def _token_ids(engine: Engine, body: _Common, param: str, given: list[Any]) -> list[int]:
    """Token ids a request names (as ints, or as the strings logit_bias keys are), each checked against the model."""
    ids = []
    for token in given:
        if not str(token).strip().isdigit() or int(token) >= engine.vocabulary:
            raise RequestError(400, f"{param}: {token!r} is not a token id of {body.model} (0 to "
                                    f"{engine.vocabulary - 1})", param=param)
        ids.append(int(token))
    return ids


def _shaping(engine: Engine, body: _Common) -> Shaping:
    bias = []
    for key, value in (body.logit_bias or {}).items():
        _token_ids(engine, body, "logit_bias", [key])
        if not -100 <= value <= 100:
            raise RequestError(400, f"logit_bias: the bias of token {key} is {value}; give -100 to 100",
                               param="logit_bias")
        bias.append((int(key), float(value)))
    repetition = body.repetition_penalty if body.repetition_penalty is not None else body.repeat_penalty
    return Shaping(presence_penalty=body.presence_penalty or 0.0, frequency_penalty=body.frequency_penalty or 0.0,
                   repetition_penalty=engine.defaults.repetition_penalty if repetition is None else repetition,
                   min_p=body.min_p or 0.0,
                   logit_bias=tuple(bias), min_tokens=body.min_tokens or 0, ignore_eos=bool(body.ignore_eos))


@dataclasses.dataclass
class _Prompt:
    text: str
    ids: list[int]


def _completion_prompts(engine: Engine, prompt: str | list[str] | list[int] | list[list[int]]) -> list[_Prompt]:
    """A completion request's prompts: each text with BOS before it (as a base model reads text), or token ids as
    given (an evaluation harness tokenizes them itself and scores them one for one)."""
    if not prompt:
        raise RequestError(400, "prompt: give a string, a non-empty list of strings or a list of token ids",
                           param="prompt")
    if isinstance(prompt, str) or all(isinstance(token, int) for token in prompt):
        listed: list[Any] = [prompt]  # one prompt, as text or as token ids
    else:
        listed = list(prompt)
    prompts = []
    for given in listed:
        if isinstance(given, str):
            prompts.append(_Prompt(given, engine.text_prompt(given)))
            continue
        ids = list(given)
        wrong = [token for token in ids if not 0 <= token < engine.vocabulary]
        if not ids or wrong:
            raise RequestError(400, f"prompt: {'an empty list of token ids' if not ids else f'{wrong[0]} is not a token id'}"
                                    f" (token ids of {engine.name} run from 0 to {engine.vocabulary - 1})",
                               param="prompt")
        prompts.append(_Prompt(engine.loaded.tokenizer.decode(ids, skip_special_tokens=True), ids))
    return prompts


@dataclasses.dataclass
class _Echo:
    """What a completion choice's text starts with: the prompt where echo asks for it, with each of its tokens'
    log-probabilities where logprobs does too."""

    text: str = ""
    ids: list[int] = dataclasses.field(default_factory=list)
    entries: list[TokenLogprob | None] = dataclasses.field(default_factory=list)


async def _echo(engine: Engine, body: CompletionRequest, prompt: _Prompt) -> _Echo:
    if not body.echo:
        return _Echo()
    entries = await engine.prompt_logprobs(prompt.ids, body.logprobs) if body.logprobs is not None else []
    return _Echo(prompt.text, prompt.ids, entries)


def _chat_logprobs(engine: Engine, sampling: Sampling, entries: list[TokenLogprob]) -> dict[str, Any] | None:
    """A chat choice's `logprobs`, as OpenAI writes it: each token with its bytes and its likeliest alternatives."""
    if sampling.logprobs is None:
        return None

    def spelled(token: int, logprob: float) -> dict[str, Any]:
        raw = engine.spelling.bytes_of(token)
        return {"token": raw.decode("utf-8", errors="replace"), "logprob": logprob, "bytes": list(raw)}

    return {"content": [{**spelled(e.token_id, e.logprob), "top_logprobs": [spelled(t, lp) for t, lp in e.top]}
                        for e in entries]}


class _CompletionLogprobs:
    """A completion choice's `logprobs` in OpenAI's legacy form (tokens, token_logprobs, top_logprobs,
    text_offset), built as its tokens arrive: the echoed prompt's first, then the answer's."""

    def __init__(self, engine: Engine, echo: _Echo) -> None:
        self.engine, self.echo = engine, echo
        self.answer_characters = engine.spelling.characters()  # the answer's, counted after the echoed text

    def echoed(self) -> dict[str, list[Any]]:
        return self._part(self.echo.ids, self.echo.entries, self.engine.spelling.characters(), 0)

    def next(self, entries: list[TokenLogprob]) -> dict[str, list[Any]]:
        """The part of answer tokens that follow the ones given before."""
        return self._part([e.token_id for e in entries], list(entries), self.answer_characters, len(self.echo.text))

    def with_answer(self, entries: list[TokenLogprob]) -> dict[str, list[Any]]:
        echoed, answered = self.echoed(), self.next(entries)
        return {key: echoed[key] + answered[key] for key in echoed}

    def _part(self, ids: list[int], entries: list[TokenLogprob | None], characters: CharacterCount,
              start: int) -> dict[str, list[Any]]:
        spelling = self.engine.spelling

        def top(entry: TokenLogprob) -> dict[str, float]:
            # vLLM's form: the likeliest words, and the token itself among them (an evaluation harness checks
            # whether it was the likeliest)
            alternatives = {spelling.text_of(t): lp for t, lp in entry.top}
            alternatives.setdefault(spelling.text_of(entry.token_id), entry.logprob)
            return alternatives

        return {"tokens": [spelling.text_of(t) for t in ids],
                "token_logprobs": [None if e is None else e.logprob for e in entries],
                "top_logprobs": [None if e is None else top(e) for e in entries],
                "text_offset": [start + characters.offset_then_add(t) for t in ids]}


def _choices(sampling: Sampling, n: int) -> list[Sampling]:
    """The sampling of each of n choices: with a seed, choice i draws from seed + i, so the n answers differ and
    each is reproducible."""
    if sampling.seed is None:
        return [sampling] * n
    return [dataclasses.replace(sampling, seed=sampling.seed + i) for i in range(n)]


async def _gather(engine: Engine, prompt: list[int], sampling: Sampling, n: int) -> list[Piece]:
    import asyncio

    return list(await asyncio.gather(*(engine.complete(prompt, choice) for choice in _choices(sampling, n))))


def _usage(prompt_tokens: int, completion_tokens: list[int]) -> dict[str, int]:
    completion = sum(completion_tokens)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion, "total_tokens": prompt_tokens + completion}


def _id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


async def _merged(streams: list[AsyncGenerator[Piece, None]]) -> AsyncIterator[tuple[int, Piece]]:
    """Pieces of several answers as each arrives, tagged with its answer's index; closing it cancels them all."""
    import asyncio

    queue: asyncio.Queue[tuple[int, Piece | None]] = asyncio.Queue()

    async def pump(index: int, stream: AsyncIterator[Piece]) -> None:
        try:
            async for piece in stream:
                await queue.put((index, piece))
        finally:
            await queue.put((index, None))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        running = len(tasks)
        while running:
            index, piece = await queue.get()
            if piece is None:
                running -= 1
            else:
                yield index, piece
    finally:
        for task in tasks:  # a client that went away: every answer's slot is freed now
            task.cancel()
        for stream in streams:
            await stream.aclose()


def _event(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


async def _chat_stream(engine: Engine, body: ChatRequest, prompt: list[int], sampling: Sampling) -> AsyncIterator[str]:
    head = {"id": _id("chatcmpl"), "object": "chat.completion.chunk", "created": int(time.time()), "model": body.model}
    for i in range(body.n):
        yield _event({**head, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                           "finish_reason": None}]})
    completion_tokens = [0] * body.n
    async for index, piece in _merged([engine.answer(prompt, choice) for choice in _choices(sampling, body.n)]):
        completion_tokens[index] = piece.completion_tokens
        delta = {"content": piece.text} if piece.text else {}
        yield _event({**head, "choices": [{"index": index, "delta": delta, "finish_reason": piece.finish_reason,
                                           "logprobs": _chat_logprobs(engine, sampling, piece.logprobs)}]})
    if _usage_wanted(body):
        yield _event({**head, "choices": [], "usage": _usage(len(prompt), completion_tokens)})
    yield "data: [DONE]\n\n"


async def _completion_stream(engine: Engine, body: CompletionRequest, prompts: list[_Prompt],
                             samplings: list[Sampling | None], echoes: list[_Echo]) -> AsyncIterator[str]:
    head = {"id": _id("cmpl"), "object": "text_completion", "created": int(time.time()), "model": body.model}
    # choice p·n + i answers prompt p; samplings are None where the request writes nothing (max_tokens 0)
    owners = [p for p in range(len(prompts)) for _ in range(body.n)]
    logprobs = [_CompletionLogprobs(engine, echoes[p]) if body.logprobs is not None else None for p in owners]
    for index, p in enumerate(owners):
        if echoes[p].text:
            part = logprobs[index]
            yield _event({**head, "choices": [{"index": index, "text": echoes[p].text, "finish_reason": None,
                                               "logprobs": part and part.echoed()}]})
    completion_tokens = [0] * len(owners)
    if body.max_tokens == 0:
        for index in range(len(owners)):
            yield _event({**head, "choices": [{"index": index, "text": "", "finish_reason": "length",
                                               "logprobs": None}]})
    else:
        streams = [engine.answer(prompts[p].ids, choice) for p, sampling in enumerate(samplings) if sampling is not None
                   for choice in _choices(sampling, body.n)]
        async for index, piece in _merged(streams):
            completion_tokens[index] = piece.completion_tokens
            part = logprobs[index]
            yield _event({**head, "choices": [{"index": index, "text": piece.text, "finish_reason": piece.finish_reason,
                                               "logprobs": part and part.next(piece.logprobs)}]})
    if _usage_wanted(body):
        yield _event({**head, "choices": [], "usage": _usage(sum(len(p.ids) for p in prompts), completion_tokens)})
    yield "data: [DONE]\n\n"


def _usage_wanted(body: _Common) -> bool:
    """`stream_options: {"include_usage": true}`: a last chunk with the usage and no choices, as OpenAI sends it."""
    return bool((body.stream_options or {}).get("include_usage"))
