"""GGUF files of a merged export, for llama.cpp and Ollama, written with the `gguf` package.

Offered: f16, bf16 and q8_0 — the types the `gguf` package can write itself (q8_0 in NumPy, one
scale per 32 weights, close to lossless). The k-quants (q4_k_m, …) need llama.cpp's own
`llama-quantize`, run on the f16 file this writes.

Architecture and tokenizer metadata are copied from the GGUF the base model came from (the
default model, or any .gguf a user trained on), which describes exactly this architecture and
vocabulary; the tensors are the merged weights, named as llama.cpp names them. A base that was
not a GGUF has no such metadata here: llama.cpp's `convert_hf_to_gguf.py` converts the merged
folder instead, and the error says so.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shitate.errors import ConfigError
from shitate.progress import status
from shitate.runs import RunFolder

TYPES = ("f16", "bf16", "q8_0")
# Fields the writer sets itself, or that describe the source file rather than the model.
_OWN_FIELDS = {"GGUF.version", "GGUF.tensor_count", "GGUF.kv_count", "general.file_type", "general.quantization_version",
               "general.name", "tokenizer.chat_template"}


def source_gguf(source: Any) -> Path | None:
    """The GGUF file a base model was converted from (its cache folder records it), if any."""
    record = Path(source.folder) / "SOURCE"
    if record.is_file():
        path = Path(record.read_text(encoding="utf-8").strip())
        return path if path.is_file() else None
    return None


def check_possible(source: Any, kinds: tuple[str, ...]) -> Path:
    """Refuse, before anything is merged, a type not offered or a base with no GGUF to take metadata from."""
    for kind in kinds:
        if kind not in TYPES:
            raise ConfigError(f"--gguf {kind}: offered types are {', '.join(TYPES)} (for k-quants run llama.cpp's "
                              "llama-quantize on the f16 file).")
    origin = source_gguf(source)
    if origin is None:
        raise ConfigError(f"--gguf: the base model {source.reference} did not come from a GGUF file, so there is no "
                          "llama.cpp metadata to copy. Export without --gguf and convert the merged folder with "
                          "llama.cpp's convert_hf_to_gguf.py.")
    return origin


def write_gguf(folder: Path, source: Any, kind: str, template: Any, modelfile: bool = True) -> Path:
    """Write `folder/model-KIND.gguf` from the merged safetensors in `folder` (and an Ollama Modelfile for it)."""
    import gguf
    import numpy as np
    from safetensors import safe_open

    origin = check_possible(source, (kind,))
    reader = gguf.GGUFReader(str(origin))
    arch = str(reader.fields["general.architecture"].contents())
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(folder)  # its attribute names are the same for every family (GPT-2's too)
    names = gguf.get_tensor_name_map(next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch),
                                     config.num_hidden_layers)
    expected = {t.name for t in reader.tensors}

    out = folder / f"model-{kind}.gguf"
    partial = out.with_name(out.name + ".partial")
    writer = gguf.GGUFWriter(str(partial), arch)
    _copy_metadata(reader, writer)
    writer.add_name(folder.name)
    writer.add_file_type({"f16": gguf.LlamaFileType.MOSTLY_F16, "bf16": gguf.LlamaFileType.MOSTLY_BF16,
                          "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[kind])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    if template.jinja is not None:
        writer.add_chat_template(template.jinja)

    written = set()
    with status(f"Writing {out.name}…"), safe_open(str(folder / "model.safetensors"), framework="pt") as tensors:
        for hf_name in tensors.keys():
            stem, _, suffix = hf_name.rpartition(".")
            name = names.get_name(stem.removeprefix("model.") if names.get_name(stem) is None else stem)
            if name is None:
                if hf_name == "lm_head.weight":
                    continue  # tied to the embeddings, as the source GGUF has it
                raise ConfigError(f"--gguf: no llama.cpp name for tensor {hf_name}; convert {folder} with "
                                  "llama.cpp's convert_hf_to_gguf.py instead.")
            name = f"{name}.{suffix}"
            data = tensors.get_tensor(hf_name).float().numpy()
            if arch.startswith("gemma") and hf_name.endswith("norm.weight"):
                data = data + 1.0  # Gemma's RMSNorm scales by (1 + w); llama.cpp stores the (1 + w)
            if arch == "llama" and stem.endswith(("q_proj", "k_proj")):
                heads = config.num_attention_heads if stem.endswith("q_proj") else config.num_key_value_heads
                data = interleave_rotary_halves(data, heads)
            if arch == "gpt2" and data.ndim == 2 and stem.endswith(("c_attn", "c_proj", "c_fc")):
                data = np.ascontiguousarray(data.T)  # GPT-2's Conv1D keeps (in, out); llama.cpp's layers (out, in)
            data, qtype = _encode(data, kind, gguf, np)
            writer.add_tensor(name, data, raw_dtype=qtype)
            written.add(name)
            if name == "token_embd.weight" and "output.weight" in expected and "lm_head.weight" not in tensors.keys():
                # A tied output layer that the source file stores as a tensor of its own (GPT-2's files do).
                writer.add_tensor("output.weight", data, raw_dtype=qtype)
                written.add("output.weight")
    if written != expected:
        partial.unlink(missing_ok=True)
        raise ConfigError(f"--gguf: the merged model's tensors do not match {origin.name}'s "
                          f"(missing {sorted(expected - written)[:3]}, extra {sorted(written - expected)[:3]}).")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    partial.rename(out)
    if modelfile:
        run = RunFolder(source.run) if source.run is not None else None
        _write_modelfile(folder, out, template, run.system_prompt() if run else None,
                         _answer_parameters(folder, (run.recipe_setting("generate", {}) or {}) if run else {}))
    return out


def _answer_parameters(folder: Path, generate: dict[str, Any]) -> list[str]:
    """The run's answer settings (its recipe's `generate:`, the model's top-k) as Modelfile parameters, so that Ollama
    answers as `shitate serve`, `compare` and `eval` do rather than with its own defaults (temperature 0.8, top-k 40,
    top-p 0.9, a repeat penalty of 1.1 and no length limit)."""
    import json

    saved = folder / "generation_config.json"
    top_k = (json.loads(saved.read_text(encoding="utf-8")) if saved.is_file() else {}).get("top_k")
    top_k = 50 if top_k is None else top_k  # transformers' default where the model names none, as sampling_top_k
    wanted = {"temperature": generate.get("temperature"), "top_p": generate.get("top_p"), "top_k": top_k,
              "repeat_penalty": generate.get("repetition_penalty"), "num_predict": generate.get("max_new_tokens")}
    return [f"PARAMETER {name} {value}" for name, value in wanted.items() if value is not None]


def interleave_rotary_halves(weights: Any, heads: int) -> Any:
    """Llama's query or key rows in llama.cpp's order (its convert_hf_to_gguf.py permutes them so): within each head,
    the rows of the two rotary halves interleaved. transformers undoes this when it reads a llama GGUF; a file
    written in transformers' order reads back with every head's rotation scrambled (Llama 3, Mistral, ELYZA and
    Swallow GGUFs are all `llama` files)."""
    return (weights.reshape(heads, 2, weights.shape[0] // heads // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def _copy_metadata(reader: Any, writer: Any) -> None:
    import gguf

    for key, field in reader.fields.items():
        if key in _OWN_FIELDS or key == "general.architecture":
            continue
        kind = field.types[0]
        if kind == gguf.GGUFValueType.ARRAY:
            writer.add_array(key, field.contents())
        else:
            writer.add_key_value(key, field.contents(), kind)


def _encode(data: Any, kind: str, gguf: Any, np: Any) -> tuple[Any, Any]:
    """1-D tensors (norms) stay f32, as llama.cpp keeps them; matrices take the file's type."""
    if data.ndim == 1:
        return data.astype(np.float32), gguf.GGMLQuantizationType.F32
    if kind == "f16":
        return data.astype(np.float16), gguf.GGMLQuantizationType.F16
    qtype = gguf.GGMLQuantizationType.BF16 if kind == "bf16" else gguf.GGMLQuantizationType.Q8_0
    return gguf.quants.quantize(data, qtype), qtype


# Ollama's prompt templates (Go templates) for the built-in chat templates: the same text as training renders.
_OLLAMA_TEMPLATES = {
    # The system prompt goes into the first user turn, as Gemma's template and training put it.
    "gemma": ('{{- $first := true }}{{- range .Messages }}{{- if ne .Role "system" }}<start_of_turn>'
              '{{ if eq .Role "assistant" }}model{{ else }}user{{ end }}\n{{ if and $first $.System }}{{ $.System }}\n\n'
              '{{ end }}{{ .Content }}<end_of_turn>\n{{ $first = false }}{{ end }}{{ end }}<start_of_turn>model\n'),
    "chatml": ('{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}'
               '<|im_start|>assistant\n'),
    "llama3": ('{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n{{ .Content }}<|eot_id|>'
               '{{ end }}<|start_header_id|>assistant<|end_header_id|>\n\n'),
}


def _ollama_plain_template(template: Any) -> str:
    """The plain template (headings, the tokenizer's own BOS and EOS) as an Ollama template; its BOS is what it renders
    for no messages. No `{{-`: it would trim the blank lines the headings need."""
    bos, eos = template([]), template.end_of_turn
    return (f'{bos}{{{{ range .Messages }}}}{{{{ if eq .Role "system" }}}}{{{{ .Content }}}}\n\n'
            f'{{{{ else if eq .Role "assistant" }}}}### Assistant:\n{{{{ .Content }}}}{eos}\n\n'
            f'{{{{ else }}}}### User:\n{{{{ .Content }}}}\n\n{{{{ end }}}}{{{{ end }}}}### Assistant:\n')


@dataclass(frozen=True)
class _Turns:
    """A chat template read as the text before each message, chosen by the message's place and role, and the text
    after the last question (its end and the cue for the answer) — what an Ollama template can say without Jinja."""

    first_system: str
    first_user: str
    user_after_system: str
    answer: str
    user_after_answer: str
    cue: str

    def render(self, messages: list[dict[str, str]]) -> str:
        """The text the Go template below writes, written here so that it can be checked against the template."""
        parts = []
        for i, message in enumerate(messages):
            parts.append((self.first_system if message["role"] == "system" else self.first_user) if i == 0 else
                         self.answer if message["role"] == "assistant" else
                         self.user_after_system if i == 1 else self.user_after_answer)
            parts.append(message["content"])
        return "".join(parts) + self.cue

    def go_template(self) -> str:
        return (f'{{{{ range $i, $m := .Messages }}}}{{{{ if eq $i 0 }}}}{{{{ if eq .Role "system" }}}}'
                f'{self.first_system}{{{{ else }}}}{self.first_user}{{{{ end }}}}'
                f'{{{{ else if eq .Role "assistant" }}}}{self.answer}{{{{ else if eq $i 1 }}}}{self.user_after_system}'
                f'{{{{ else }}}}{self.user_after_answer}{{{{ end }}}}{{{{ .Content }}}}{{{{ end }}}}{self.cue}')


def _read_turns(template: Any) -> _Turns | None:
    """A model's own (Jinja) chat template as _Turns, or None where it is not that regular: the text around each
    message is read off two renderings of marked messages, then checked on conversations of every shape a chat
    sends (with and without a system message, one and several turns)."""
    system, first, answer, second = "SHITATE_SYSTEM_1", "SHITATE_QUESTION_1", "SHITATE_ANSWER_1", "SHITATE_QUESTION_2"

    def around(messages: list[dict[str, str]]) -> list[str] | None:
        text, pieces = template(messages, add_generation_prompt=True), []
        for message in messages:
            before, found, text = text.partition(message["content"])
            if not found:
                return None
            pieces.append(before)
        return [*pieces, text]

    def conversation(*turns: tuple[str, str]) -> list[dict[str, str]]:
        return [{"role": role, "content": content} for role, content in turns]

    try:
        with_system = around(conversation(("system", system), ("user", first), ("assistant", answer), ("user", second)))
        without = around(conversation(("user", first), ("assistant", answer), ("user", second)))
        if with_system is None or without is None or with_system[2:] != without[1:]:
            return None
        turns = _Turns(with_system[0], without[0], with_system[1], *with_system[2:])
        if any("{{" in piece or '"""' in piece for piece in (with_system + without)):
            return None  # not literal text in a Go template or a Modelfile
        checks = [conversation(("user", "こんにちは")), conversation(("system", "丁寧に"), ("user", "なぜ?")),
                  conversation(("user", "一"), ("assistant", "二"), ("user", "三"), ("assistant", "四"), ("user", "五")),
                  conversation(("system", "短く"), ("user", "a"), ("assistant", "b"), ("user", "c"))]
        return turns if all(turns.render(c) == template(c, add_generation_prompt=True) for c in checks) else None
    except Exception:  # noqa: BLE001 - a template that refuses a shape (a system message, …) is not regular either
        return None


def _write_modelfile(folder: Path, gguf_file: Path, template: Any, system: str | None,
                     parameters: list[str] | None = None) -> None:
    """An Ollama Modelfile beside the GGUF (`ollama create NAME -f Modelfile`), with the run's system prompt and
    answer settings."""
    lines = [f"FROM ./{gguf_file.name}"]
    if template.name in _OLLAMA_TEMPLATES:
        lines.append(f'TEMPLATE """{_OLLAMA_TEMPLATES[template.name]}"""')
    elif template.name == "plain":
        lines.append(f'TEMPLATE """{_ollama_plain_template(template)}"""')
    elif (turns := _read_turns(template)) is not None:
        # The model's own template, as training rendered it (a thinking switch off included): Ollama does not run
        # the GGUF's Jinja but guesses a template of its own from it, and for an unfamiliar one guesses none.
        lines.append(f'TEMPLATE """{turns.go_template()}"""')
        padded = [{"role": "user", "content": " ひと言\n"}]
        if turns.render(padded) != template(padded, add_generation_prompt=True):
            lines.append("# The model's template trims the whitespace around each message, which Ollama's templates "
                         "cannot; send messages without it.")
    else:
        lines.append("# No TEMPLATE: the model's chat template writes turns in a way an Ollama template cannot say "
                     "(Ollama then guesses one from the GGUF); check `ollama show --template` against training's.")
    if system:
        lines.append(f'SYSTEM """{system}"""')
    lines.append(f'PARAMETER stop "{template.end_of_turn}"')
    lines += parameters or []
    (folder / "Modelfile").write_text("\n".join(lines) + "\n", encoding="utf-8")
