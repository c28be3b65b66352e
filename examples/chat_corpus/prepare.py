"""Turn RealPersonaChat dialogues into text for continued pretraining: eight utterances a document, one a line.

RealPersonaChat (nu-dialogue/real-persona-chat, CC BY-SA 4.0) is read from ../shared/data beside the
repository; the files written here are derived from it and fall under the same licence.

    python examples/chat_corpus/prepare.py [--dialogues 60] [--held-out 8]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

HERE = Path(__file__).resolve().parent
SOURCE = HERE.parents[2] / "shared" / "data" / "real-persona-chat" / "dialogues-2000.jsonl"
UTTERANCES_PER_DOCUMENT = 8  # about 150 tokens: a document fits a 256-token row whole


def documents(dialogue: dict) -> list[str]:
    lines = [u["text"].strip() for u in dialogue["utterances"] if u["text"].strip()]
    return ["\n".join(lines[i:i + UTTERANCES_PER_DOCUMENT]) for i in range(0, len(lines), UTTERANCES_PER_DOCUMENT)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dialogues", type=int, default=60, help="dialogues to train on")
    parser.add_argument("--held-out", type=int, default=8, help="further dialogues for the perplexity check")
    parser.add_argument("--source", type=Path, default=SOURCE)
    args = parser.parse_args()
    if not args.source.is_file():
        raise SystemExit(f"{args.source}: not found. This example reads RealPersonaChat from ../shared/data/; "
                         "pass --source PATH to dialogues-2000.jsonl.")
    with args.source.open(encoding="utf-8") as handle:
        dialogues = [json.loads(line) for _, line in zip(range(args.dialogues + args.held_out), handle)]
    out = HERE / "data"
    out.mkdir(exist_ok=True)
    for name, part in (("train", dialogues[:args.dialogues]), ("validation", dialogues[args.dialogues:])):
        texts = [text for dialogue in part for text in documents(dialogue)]
        (out / f"{name}.jsonl").write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts),
                                           encoding="utf-8")
        print(f"{out / f'{name}.jsonl'}: {len(texts)} documents from {len(part)} dialogues")


if __name__ == "__main__":
    main()
