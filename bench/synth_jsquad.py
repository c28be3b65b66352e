"""How grounded is `data synth --mode model`? Measured on JSQuAD, whose Wikipedia paragraphs come with gold
questions and answers (../shared/data/jglue/jsquad-valid.json, CC BY-SA 4.0).

For each of the first N paragraphs the generator writes question/answer pairs from shitate's few-shot prompt.
Printed: pairs per paragraph; the share of generated answers that are spans of their paragraph (before and
after shitate's filters); what each filter dropped; and how close the generated questions come to the gold
ones (best character F1 against any gold question of the same paragraph), beside the same figure for the gold
questions of a *different* paragraph — the level that shared phrasing like 「…は何か。」 alone reaches.

    .venv/bin/python bench/synth_jsquad.py --generator gemma-3-270m --paragraphs 50
    .venv/bin/python bench/synth_jsquad.py --generator http://127.0.0.1:8080/v1 --paragraphs 200   # any server
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from shitate.data.synth import parse_pairs, synth_prompt, synthesize
from shitate.evals.metrics import char_f1
from shitate.memory import cpu_model
from shitate.workflow import synth_generator

JSQUAD = Path(__file__).resolve().parents[2] / "shared" / "data" / "jglue" / "jsquad-valid.json"


def paragraphs(path: Path, count: int) -> list[dict]:
    found = []
    for article in json.loads(path.read_text(encoding="utf-8"))["data"]:
        for paragraph in article["paragraphs"]:
            # JSQuAD puts the article title before the text with " [SEP] ": the passage is what follows.
            title, _, text = paragraph["context"].partition(" [SEP] ")
            found.append({"text": text or title, "heading": title, "source": "jsquad",
                          "gold": [qa["question"] for qa in paragraph["qas"]]})
            if len(found) == count:
                return found
    return found


def best_f1(question: str, gold: list[str]) -> float:
    return max((char_f1(question, g) for g in gold), default=0.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--generator", default="gemma-3-270m", help="a model shitate loads, or an OpenAI-compatible URL")
    parser.add_argument("--paragraphs", type=int, default=50)
    parser.add_argument("--per-passage", type=int, default=3)
    parser.add_argument("--jsquad", type=Path, default=JSQUAD)
    args = parser.parse_args()

    items = paragraphs(args.jsquad, args.paragraphs)
    ask = synth_generator(args.generator)
    started = time.perf_counter()
    outputs: dict[str, str] = {}

    def recording(prompts: list[str]) -> list[str]:
        answers = ask(prompts)
        outputs.update(zip(prompts, answers))
        return answers

    records, report = synthesize(items, "model", recording, args.per_passage)
    seconds = time.perf_counter() - started
    generated = [parse_pairs(outputs[synth_prompt(item["text"])])[:args.per_passage] for item in items]
    raw = [(item, q, a) for item, pairs in zip(items, generated) for q, a in pairs]
    kept = [(r["context"], r["messages"][0]["content"], r["messages"][1]["content"]) for r in records]
    gold = {item["text"]: item["gold"] for item in items}

    def share(pairs: list[tuple[str, str, str]]) -> str:
        return f"{sum(a in passage for passage, _, a in pairs) / len(pairs):.1%}" if pairs else "n/a"

    print(f"CPU: {cpu_model()}; generator {args.generator}; {len(items)} JSQuAD paragraphs; {seconds:.0f} s "
          f"({seconds / len(items):.1f} s a paragraph)")
    print(f"pairs parsed: {len(raw)} ({len(raw) / len(items):.2f} a paragraph); "
          f"paragraphs with none: {sum(1 for pairs in generated if not pairs)}")
    print(f"answers that are spans of their paragraph: {share([(i['text'], q, a) for i, q, a in raw])} of all, "
          f"{share(kept)} of the {len(kept)} kept")
    print("filters: " + "; ".join(report.lines()))
    if kept:
        overlap = sum(best_f1(q, gold[p]) for p, q, _ in kept) / len(kept)
        print(f"question overlap with gold (best char F1): {overlap:.3f} for kept questions")
    chance = sum(best_f1(q, items[(i + 1) % len(items)]["gold"]) for i, item in enumerate(items)
                 for q in item["gold"]) / sum(len(item["gold"]) for item in items)
    print(f"  reference: gold questions against another paragraph's gold questions: {chance:.3f}")
    for item, pairs in list(zip(items, generated))[:3]:
        print(f"\n[{item['heading']}] gold: {item['gold'][0]}")
        for q, a in pairs:
            print(f"  Q: {q}\n  A: {a}")


if __name__ == "__main__":
    main()
