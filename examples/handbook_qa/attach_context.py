"""Hand-written questions about the handbook → a test file with each question's passage as context.

questions.jsonl holds questions as an employee would ask them, with short reference answers that cite the
article (written for this example, not generated). Each names the article (`heading`) and a phrase its passage
contains; this script finds that passage in data/passages.jsonl and writes data/questions.jsonl in chat form,
so `shitate eval --test` can score answers against the references, context included as in training.
"""

from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> None:
    passages = [json.loads(line) for line in (HERE / "data" / "passages.jsonl").read_text(encoding="utf-8").splitlines()]
    out = []
    for line in (HERE / "questions.jsonl").read_text(encoding="utf-8").splitlines():
        item = json.loads(line)
        passage = next((p for p in passages if p["heading"].endswith(item["heading"]) and item["contains"] in p["text"]),
                       None)
        if passage is None:
            raise SystemExit(f"questions.jsonl: no passage of {item['heading']} contains {item['contains']!r}")
        out.append({"messages": [{"role": "user", "content": item["question"]},
                                 {"role": "assistant", "content": item["answer"]}], "context": passage["text"]})
    target = HERE / "data" / "questions.jsonl"
    target.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in out), encoding="utf-8")
    print(f"{len(out)} hand-written questions with their passages → {target.relative_to(HERE.parents[1])}")


if __name__ == "__main__":
    main()
