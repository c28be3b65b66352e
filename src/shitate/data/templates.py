"""Chat templates and the assistant-only loss mask.

The mask is derived from the rendering itself: for each assistant turn we render the
conversation up to the generation prompt and up to the end of that turn; the characters
in between are what the model must learn to write, and tokenizer offsets map them to
tokens. No template carries hand-written token ids, so a new template (or the
tokenizer's own Jinja template) gets a correct mask for free.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from shitate.errors import ConfigError

Message = dict[str, str]
IGNORE_INDEX = -100

# Gemma 3's image markers: control tokens (special in Google's tokenizer.json), but a GGUF file, the default model's
# among them, marks them as plain added ones. models/load.py flags them special again.
GGUF_UNFLAGGED_CONTROL_TOKENS = ("<start_of_image>", "<end_of_image>", "[multimodal]")
# Strings that mean "turn boundary" (or another control token) to some model family; inside content they corrupt
# training.
SPECIAL_MARKERS: tuple[str, ...] = (
    "<start_of_turn>", "<end_of_turn>", "<bos>", "<eos>",
    "<|im_start|>", "<|im_end|>", "<|endoftext|>",
    "<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
    "<image_soft_token>", *GGUF_UNFLAGGED_CONTROL_TOKENS,
)
# The shapes of control tokens' text: <…>, <|…|> or […] without spaces.
_MARKUP = re.compile(r"<\|[^|\s]{1,64}\|>|<[^<>\s]{1,64}>|\[[^\[\]\s]{1,64}\]")


class SpecialMarkers:
    """The strings in a text that its tokenizer would turn into control tokens rather than read as text.

    The tokenizer's named special tokens, and every added token it flags special (Gemma's 6,242 <unusedN> among
    them): an added token is matched in text before the vocabulary applies. Added tokens not flagged special are
    text (Gemma's <table>, <h1>, whitespace runs).
    """

    def __init__(self, tokenizer: Any = None) -> None:
        named = set(SPECIAL_MARKERS) | set(getattr(tokenizer, "all_special_tokens", ()) or ())
        added = getattr(tokenizer, "added_tokens_decoder", None) or {}
        named |= {str(token) for token in added.values() if getattr(token, "special", False)}
        named -= {"", "<unk>", "<pad>"}
        # Found by one regular-expression pass and a set lookup: a loop over 6,000 markers per text was not cheap.
        self._markup = {m for m in named if _MARKUP.fullmatch(m)}
        self._other = sorted(named - self._markup)  # a special token of another shape: searched for as it is

    def found_in(self, text: str) -> list[str]:
        """The markers in text, each once, in the order they first appear."""
        found = [m for m in _MARKUP.findall(text) if m in self._markup]
        found += [m for m in self._other if m in text]
        return list(dict.fromkeys(found))


class RewrittenAnswer(ConfigError):
    """An answer the template does not render as written: a fault of one record, which callers report with its line."""

    def __init__(self, template: str, answer: str, end_marker: str) -> None:
        opening = answer if len(answer) <= 24 else answer[:24] + "…"
        self.what = (f"the answer {opening!r} is not in the conversation as template {template} renders it, "
                     f"followed by {end_marker!r}: the template rewrites it (Qwen3's drops reasoning inside <think> "
                     "from answers before the last question)")
        self.fix = "remove that part of the answer, or choose a built-in template (gemma, chatml, llama3, plain)"
        super().__init__(f"{self.what}; {self.fix}.")


@dataclass(frozen=True)
class ChatTemplate:
    """A way to turn messages into text, and the marker that ends an assistant turn."""

    name: str
    render: Callable[[list[Message], bool], str]
    end_of_turn: str
    # The same rendering as a Jinja chat template, written into an exported model's tokenizer_config.json so that
    # transformers, vLLM and TGI render prompts exactly as training did (a test holds the two to the same bytes).
    jinja: str | None = None

    def __call__(self, messages: list[Message], add_generation_prompt: bool = False) -> str:
        return self.render(messages, add_generation_prompt)


def _split_system(messages: list[Message]) -> tuple[str | None, list[Message]]:
    if messages and messages[0]["role"] == "system":
        return messages[0]["content"], messages[1:]
    return None, messages


def _gemma(messages: list[Message], add_generation_prompt: bool) -> str:
    # Gemma has no system role; its official template prepends the system text to the first user turn.
    system, turns = _split_system(messages)
    parts = ["<bos>"]
    for i, message in enumerate(turns):
        role = "model" if message["role"] == "assistant" else "user"
        content = message["content"]
        if i == 0 and system is not None:
            content = f"{system}\n\n{content}"
        parts.append(f"<start_of_turn>{role}\n{content}<end_of_turn>\n")
    if add_generation_prompt:
        parts.append("<start_of_turn>model\n")
    return "".join(parts)


def _chatml(messages: list[Message], add_generation_prompt: bool) -> str:
    parts = [f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages]
    if add_generation_prompt:
        parts.append("<|im_start|>assistant\n")
    return "".join(parts)


def _llama3(messages: list[Message], add_generation_prompt: bool) -> str:
    parts = ["<|begin_of_text|>"]
    parts += [f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n{m['content']}<|eot_id|>" for m in messages]
    if add_generation_prompt:
        parts.append("<|start_header_id|>assistant<|end_header_id|>\n\n")
    return "".join(parts)


def _plain(bos: str, eos: str) -> Callable[[list[Message], bool], str]:
    # For base models with no turn tokens: readable headings, and the tokenizer's EOS ends an answer.
    def render(messages: list[Message], add_generation_prompt: bool) -> str:
        system, turns = _split_system(messages)
        parts = [bos]
        if system is not None:
            parts.append(f"{system}\n\n")
        for message in turns:
            if message["role"] == "assistant":
                parts.append(f"### Assistant:\n{message['content']}{eos}\n\n")
            else:
                parts.append(f"### User:\n{message['content']}\n\n")
        if add_generation_prompt:
            parts.append("### Assistant:\n")
        return "".join(parts)

    return render


_SYSTEM_AND_TURNS = ("{%- if messages and messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] %}"
                     "{% set turns = messages[1:] %}{% else %}{% set system = none %}{% set turns = messages %}"
                     "{% endif %}")
GEMMA_JINJA = (
    "{{ '<bos>' }}" + _SYSTEM_AND_TURNS +
    "{%- for message in turns %}"
    "{%- set role = 'model' if message['role'] == 'assistant' else 'user' %}"
    "{%- set content = (system + '\\n\\n' + message['content']) if (loop.first and system is not none) "
    "else message['content'] %}"
    "{{ '<start_of_turn>' + role + '\\n' + content + '<end_of_turn>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}")
CHATML_JINJA = (
    "{%- for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
LLAMA3_JINJA = (
    "{{ '<|begin_of_text|>' }}{%- for message in messages %}{{ '<|start_header_id|>' + message['role'] + "
    "'<|end_header_id|>\\n\\n' + message['content'] + '<|eot_id|>' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}")


def _plain_jinja(bos: str, eos: str) -> str:
    import json

    return ("{{ " + json.dumps(bos) + " }}" + _SYSTEM_AND_TURNS +
            "{%- if system is not none %}{{ system + '\\n\\n' }}{% endif %}"
            "{%- for message in turns %}{%- if message['role'] == 'assistant' %}"
            "{{ '### Assistant:\\n' + message['content'] + " + json.dumps(eos) + " + '\\n\\n' }}"
            "{%- else %}{{ '### User:\\n' + message['content'] + '\\n\\n' }}{%- endif %}{%- endfor %}"
            "{%- if add_generation_prompt %}{{ '### Assistant:\\n' }}{% endif %}")


# A template with a thinking switch (Qwen3's `enable_thinking`) is rendered with thinking off, in training and in
# generation alike: tailoring data holds answers, not reasoning, and with thinking on every answer would be trained
# and shown behind an empty <think></think> block. Exported, the template says so itself, so that transformers, vLLM
# and Ollama prompt the model as it was trained unless asked otherwise.
THINKING_OFF = "{%- set enable_thinking = enable_thinking if enable_thinking is defined else false %}"


def _tokenizer_template(tokenizer: Any) -> ChatTemplate:
    source = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else None
    switches = {"enable_thinking": False} if source and "enable_thinking" in source else {}

    def render(messages: list[Message], add_generation_prompt: bool) -> str:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                                             **switches)

    # The end marker is whatever the template writes right after an assistant's words.
    probe = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "ANSWER_PROBE"}]
    text = render(probe, False)
    tail = text[text.rindex("ANSWER_PROBE") + len("ANSWER_PROBE"):].strip()
    end = tail.split()[0] if tail else (tokenizer.eos_token or "")
    if not end:
        raise ConfigError("template: the tokenizer's own template writes nothing after an answer, so a model "
                          "could never learn to stop; choose one of gemma, chatml, llama3, plain.")
    if switches and source is not None and not source.startswith(THINKING_OFF):
        source = THINKING_OFF + source
    return ChatTemplate("auto", render, end, source)


def get_template(name: str, tokenizer: Any, model_type: str | None = None) -> ChatTemplate:
    """Resolve a template name; `auto` takes the tokenizer's own, else the model family's if the tokenizer knows its
    end marker, else plain."""
    if name == "auto":
        if getattr(tokenizer, "chat_template", None):
            return _tokenizer_template(tokenizer)
        family = (model_type or "").lower()
        built_in = get_template("gemma" if "gemma" in family else "llama3" if "llama" in family else "chatml", tokenizer)
        # A base model with no turn markers in its vocabulary (a Japanese GPT-2, a Llama 2) would learn the family's
        # markers in pieces, and generation would not stop at a piece; plain ends answers with its own EOS token.
        if end_marker_is_one_token(tokenizer, built_in) or not tokenizer.eos_token:
            return built_in
        return get_template("plain", tokenizer)
    if name == "gemma":
        return ChatTemplate("gemma", _gemma, "<end_of_turn>", GEMMA_JINJA)
    if name == "chatml":
        return ChatTemplate("chatml", _chatml, "<|im_end|>", CHATML_JINJA)
    if name == "llama3":
        return ChatTemplate("llama3", _llama3, "<|eot_id|>", LLAMA3_JINJA)
    if name == "plain":
        eos = tokenizer.eos_token or ""
        if not eos:
            raise ConfigError("template plain: the tokenizer has no EOS token to end answers with; pick another template.")
        bos = tokenizer.bos_token or ""
        return ChatTemplate("plain", _plain(bos, eos), eos, _plain_jinja(bos, eos))
    raise ConfigError(f"template: unknown template {name!r}; expected one of auto, gemma, chatml, llama3, plain")


def assistant_spans(messages: list[Message], template: ChatTemplate) -> tuple[str, list[tuple[int, int]]]:
    """Render a conversation and return the character spans the model is trained to produce.

    Each span runs from where the generation prompt (the conversation before that turn, rendered with the cue a
    model answers after) and the whole conversation's rendering part, to the end-of-turn marker after the turn's
    words. For most templates the whole prompt is shared. Qwen3's, with thinking off, cues each answer with an empty
    <think></think> block but writes it only before the last answer: an earlier answer is trained from where the
    two renderings part, as the whole conversation shows it. A turn with weight 0 (OpenAI's format) stays in the
    text but has no span.
    """
    text = template(messages)
    end_marker = template.end_of_turn
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant" or message.get("weight", 1) == 0:
            continue
        history = template(messages[:i])
        if not text.startswith(history):
            raise ConfigError(
                f"template {template.name}: the conversation before an answer renders differently once the answer "
                "follows, so the answers cannot be located; choose a built-in template (gemma, chatml, llama3, plain)."
            )
        start = len(os.path.commonprefix([template(messages[:i], add_generation_prompt=True), text]))
        words = message["content"].strip()
        if not text.startswith(words, start):
            # The renderings may part inside the answer, where it begins as the cue goes on ("<div>…", "<think>…").
            start -= next((k for k in range(1, min(len(words), start - len(history) + 1))
                           if text.startswith(words, start - k)), 0)
        at = text.find(words, start)
        end = text.find(end_marker, at + len(words)) if at >= 0 else -1
        if at < 0 or end_marker in text[start:at] or end < 0:
            raise RewrittenAnswer(template.name, message["content"], end_marker)
        spans.append((start, end + len(end_marker)))
    return text, spans


def encode_chat(messages: list[Message], tokenizer: Any, template: ChatTemplate, max_length: int) -> dict[str, list[int]]:
    """Token ids and labels (IGNORE_INDEX outside the answers), cut to max_length on the right."""
    text, spans = assistant_spans(messages, template)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    input_ids: list[int] = encoded["input_ids"]
    labels = [IGNORE_INDEX] * len(input_ids)
    span_index = 0
    for t, (start, end) in enumerate(encoded["offset_mapping"]):
        while span_index < len(spans) and start >= spans[span_index][1]:
            span_index += 1
        if span_index < len(spans) and spans[span_index][0] <= start < spans[span_index][1] and end > start:
            labels[t] = input_ids[t]
    return {"input_ids": input_ids[:max_length], "labels": labels[:max_length]}


def end_marker_is_one_token(tokenizer: Any, template: ChatTemplate) -> bool:
    """Whether the tokenizer knows the template's end marker as one token (else the model learns it in pieces,
    and pieces may merge with the next turn's text)."""
    return len(tokenizer(template.end_of_turn, add_special_tokens=False)["input_ids"]) == 1


def stop_token_ids(tokenizer: Any, template: ChatTemplate) -> list[int]:
    """Ids that end generation: the tokenizer's EOS and the template's end-of-turn marker."""
    ids = []
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    marker = tokenizer(template.end_of_turn, add_special_tokens=False)["input_ids"]
    if len(marker) == 1 and marker[0] not in ids:
        ids.append(marker[0])
    return ids
