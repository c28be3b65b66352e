"""`shitate export RUN`: the run's adapter merged into a full-precision copy of its base, saved as a plain model
folder that any tool loads, then checked against the adapter it came from.

The merge happens in fp32 on a dequantised base (a QLoRA run's base is loaded again in full precision; a GGUF
base was dequantised into the safetensors cache), never into quantised weights, and is cast to the saved dtype
afterwards. The chat template the run trained with goes into `tokenizer_config.json` as Jinja, and its
end-of-turn token into `generation_config.json`, so transformers, vLLM and TGI render and stop as training did.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shitate.errors import ConfigError, ShitateError
from shitate.progress import say, status

# Probes for the parity check: short Japanese requests of the kinds users send.
PROBES = ["なんで空は青いの?", "日本の首都はどこですか。", "おすすめの本を教えてください。", "明日の会議の議題をまとめて。",
          "雨の日の楽しみ方は?", "ありがとう!"]
PARITY_TOKENS = 16
# A quantised file may flip the run's choice where its top two tokens are nearly tied (q8_0 did at 10-17% of the
# positions of the 270M kids_qa run); where the run's choice leads by this many logits, every export must agree.
DECIDED_MARGIN = 1.0
REQUIRED_AGREEMENT = 0.99


class ParityFailed(ShitateError):
    """An exported file does not answer like the run it came from."""


@dataclass
class Parity:
    """How often an exported file's next-token choice equals the run's along the run's own greedy answers: at the
    decided positions (the run's top token leads its second by ≥ DECIDED_MARGIN logits, a choice rounding cannot
    flip), which must agree, and at all positions (near-ties included), which is reported."""

    name: str
    decided: float | None  # None where no position was decided (a barely trained toy model): then all positions count
    overall: float
    answers: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return (self.decided if self.decided is not None else self.overall) >= REQUIRED_AGREEMENT

    def agreement(self) -> str:
        if self.decided is None:
            return (f"{self.overall:.1%} of the run's next-token choices agree (none is decided, so all count; needs "
                    f"{REQUIRED_AGREEMENT:.0%})")
        return (f"{self.decided:.1%} of the run's decided next-token choices agree (needs {REQUIRED_AGREEMENT:.0%}), "
                f"{self.overall:.1%} of all")


def export(run: Path, out: Path, dtype: str = "bf16", gguf_types: tuple[str, ...] = (), force: bool = False,
           check: bool = True) -> list[Parity]:
    """Merge, save and (unless `check` is off) verify; return the parity figures. Raises ParityFailed."""
    import torch

    from shitate.data.templates import get_template, stop_token_ids
    from shitate.models.load import load_model, load_tokenizer, resolve
    from shitate.runs import RunFolder

    source = resolve(str(run))
    if source.run is None:
        raise ConfigError(f"{run}: not a run folder (no recipe.yaml). shitate export takes what `shitate train` made.")
    if out.exists() and any(out.iterdir()) and not force:
        raise ConfigError(f"{out} exists and is not empty; pass --force to replace it, or choose another --out.")
    if gguf_types:
        from shitate.export.gguf import check_possible

        check_possible(source, gguf_types)
    saved_dtype = {"bf16": torch.bfloat16, "f16": torch.float16, "fp32": torch.float32}[dtype]
    with status(f"Merging {run}'s adapter into a full-precision copy of its base…"):
        model = load_model(source, dtype=torch.float32, merge_adapter=True)
        tokenizer = load_tokenizer(source)
        template = get_template(RunFolder(source.run).recipe_setting("template", "auto"), tokenizer,
                                model.config.model_type)
    _save(model.to(saved_dtype), tokenizer, template, stop_token_ids(tokenizer, template), out)
    say(f"Saved the merged model ({dtype}) to {out} with the {template.name} chat template in tokenizer_config.json.")
    del model
    files = []
    if gguf_types:
        from shitate.export.gguf import write_gguf

        for kind in gguf_types:  # the Modelfile points at the first type asked for
            files.append(write_gguf(out, source, kind, template, modelfile=kind == gguf_types[0]))
    if not check:
        return []
    results = check_parity(run, out, files)
    for result in results:
        say(f"parity {result.name}: {result.agreement()} — {'ok' if result.passed else 'FAILED'}")
    failed = [r for r in results if not r.passed]
    if failed:
        raise ParityFailed(f"{', '.join(r.name for r in failed)} does not answer like {run}: "
                           f"{failed[0].agreement()}. Do not ship it; export with --dtype fp32 (or a larger GGUF "
                           "type) and compare again.")
    return results


def _save(model: Any, tokenizer: Any, template: Any, stop_ids: list[int], out: Path) -> None:
    """Write the folder under a temporary name and rename it: a crash leaves no half-written export."""
    import shutil

    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    model.generation_config.eos_token_id = stop_ids
    model.save_pretrained(partial, safe_serialization=True)
    if template.jinja is not None:
        tokenizer.chat_template = template.jinja
    tokenizer.save_pretrained(partial)
    if template.jinja is not None:
        # transformers 5 writes the template to chat_template.jinja; older loaders and other servers read it from
        # tokenizer_config.json, so it goes there as well.
        import json

        config_file = partial / "tokenizer_config.json"
        config = json.loads(config_file.read_text(encoding="utf-8"))
        config["chat_template"] = template.jinja
        config_file.write_text(json.dumps(config, ensure_ascii=False, indent=2), encoding="utf-8")
    shutil.rmtree(out, ignore_errors=True)
    partial.rename(out)


def check_parity(run: Path, merged: Path, gguf_files: list[Path]) -> list[Parity]:
    """Teacher-forced next-token agreement on the probes: the run (adapter on its base, fp32) writes greedy answers;
    every export reads the same tokens and must choose the run's token at (nearly) every position."""
    import torch

    from shitate.models.inference import load_for_inference
    from shitate.runs import RunFolder

    reference = load_for_inference(str(run), dtype=torch.float32)
    tokenizer, template = reference.tokenizer, reference.template
    system = RunFolder(run).system_prompt()
    opening = [{"role": "system", "content": system}] if system else []
    prompts = [tokenizer(template(opening + [{"role": "user", "content": p}], add_generation_prompt=True),
                         add_special_tokens=False, return_tensors="pt")["input_ids"] for p in PROBES]
    sequences, choices, decided = [], [], []
    with torch.inference_mode():
        for ids in prompts:
            output = reference.model.generate(ids.to(reference.model.device), max_new_tokens=PARITY_TOKENS,
                                              do_sample=False, pad_token_id=tokenizer.pad_token_id)
            sequences.append(output)
            logits = _answer_logits(reference.model, output, ids.shape[1])
            top2 = logits.topk(2, dim=-1).values
            choices.append(logits.argmax(-1))
            decided.append(top2[:, 0] - top2[:, 1] >= DECIDED_MARGIN)
    answers = [tokenizer.decode(s[0, p.shape[1]:], skip_special_tokens=True) for s, p in zip(sequences, prompts)]
    del reference

    def score(name: str, got: list[Any]) -> Parity:
        same = [torch.as_tensor(g) == e for g, e in zip(got, choices)]
        decided_same = sum(int(m[d].sum()) for m, d in zip(same, decided))
        decided_total = sum(int(d.sum()) for d in decided)
        return Parity(name, decided_same / decided_total if decided_total else None,
                      sum(int(m.sum()) for m in same) / max(sum(m.numel() for m in same), 1), answers)

    results = []
    for name, gguf_file in [("merged safetensors", None)] + [(f"gguf {f.name}", f) for f in gguf_files]:
        model = _load_export(merged, gguf_file)
        with torch.inference_mode():
            results.append(score(name, [_answer_logits(model, output, prompt.shape[1]).argmax(-1)
                                        for output, prompt in zip(sequences, prompts)]))
        del model
    if gguf_files and importlib.util.find_spec("llama_cpp") is not None:
        for gguf_file in gguf_files:  # the files as llama.cpp itself reads and runs them
            got = _llama_cpp_choices(gguf_file, [(s[0].tolist(), p.shape[1]) for s, p in zip(sequences, prompts)])
            if got is not None:
                results.append(score(f"llama.cpp {gguf_file.name}", got))
    return results


_LLAMA_CPP_CHOICES = """
import json, sys
import numpy as np
from llama_cpp import Llama
gguf_file, rows = sys.argv[1], json.loads(sys.stdin.read())
longest = max(len(tokens) for tokens, _ in rows)
llm = Llama(model_path=gguf_file, n_ctx=max(256, longest + 8), logits_all=True, verbose=False)
out = []
for tokens, prompt_length in rows:
    llm.reset()
    llm.eval(tokens)
    scores = np.asarray(llm.scores[:len(tokens)])
    out.append(scores[prompt_length - 1:-1].argmax(-1).tolist())
print(json.dumps(out))
"""


def _llama_cpp_choices(gguf_file: Path, rows: list[tuple[list[int], int]]) -> list[list[int]] | None:
    """llama.cpp's top token at each answer position (llama-cpp-python), in a child process: a llama.cpp build
    that crashes on this CPU is reported, not allowed to take the export down with it."""
    import json
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-c", _LLAMA_CPP_CHOICES, str(gguf_file)], input=json.dumps(rows),
                            capture_output=True, text=True)
    if result.returncode != 0:
        say(f"[yellow]note:[/] llama.cpp (llama-cpp-python) could not run {gguf_file.name} here (exit "
            f"{result.returncode}); checked through transformers only.")
        return None
    return json.loads(result.stdout.strip().splitlines()[-1])


def _answer_logits(model: Any, sequence: Any, prompt_length: int) -> Any:
    """The model's logits at each position that predicts an answer token of `sequence`."""
    return model(sequence.to(model.device)).logits[0, prompt_length - 1:-1].float().cpu()


def _load_export(folder: Path, gguf_file: Path | None) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    if gguf_file is None:
        return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, local_files_only=True).eval()
    return AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name, dtype=torch.float32,
                                                local_files_only=True).eval()


