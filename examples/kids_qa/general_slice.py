"""A slice of everyday chat from Dolly-ja for the mixed recipe: short answers to plain questions and requests.

databricks-dolly-15k-ja (kunishou, CC BY-SA 3.0) is read from ../shared/data beside the repository;
data/general.jsonl, written here, is derived from it and falls under the same licence. Kept: records with
no context passage whose instruction is short and not a why-question (those are the kids' own form) and
whose answer fits in a sentence or two, in the categories open_qa, general_qa, brainstorming and
creative_writing; the first 400 in file order.

    python examples/kids_qa/general_slice.py
"""

from __future__ import annotations

from pathlib import Path

from shitate.data.formats import import_records, write_jsonl

HERE = Path(__file__).resolve().parent
SOURCE = HERE.parents[2] / "shared" / "data" / "dolly-ja" / "databricks-dolly-15k-ja.jsonl"
CATEGORIES = ("open_qa", "general_qa", "brainstorming", "creative_writing")
WHY = ("なぜ", "なんで", "どうして", "理由")


def main() -> None:
    import json

    if not SOURCE.is_file():
        raise SystemExit(f"{SOURCE}: not found; this example reads Dolly-ja from ../shared/data/.")
    raw = [json.loads(line) for line in SOURCE.open(encoding="utf-8")]
    records, _ = import_records(SOURCE, fmt="dolly", skip_bad=True)
    # import_records keeps the file's order and skips only broken records; match them back by instruction.
    category = {r["instruction"].strip(): r["category"] for r in raw}
    kept = [r for r in records if "context" not in r
            and category.get(r["messages"][0]["content"]) in CATEGORIES
            and len(r["messages"][0]["content"]) <= 60 and len(r["messages"][1]["content"]) <= 120
            and not any(word in r["messages"][0]["content"] for word in WHY)][:400]
    count = write_jsonl(HERE / "data" / "general.jsonl", kept)
    print(f"{HERE / 'data' / 'general.jsonl'}: {count} everyday question/answer pairs from Dolly-ja")


if __name__ == "__main__":
    main()
