"""Precision and recall of `shitate data scrub`, per kind of personal data, on the labelled files the tests ship.

tests/assets/pii-labelled.txt is the file the patterns were tuned on; tests/assets/pii-heldout.txt was written
afterwards and not tuned on, so its figures are the honest ones. A finding counts only with the exact span and
kind of a label. Both files are invented Japanese business text (names, numbers and addresses made up).

    .venv/bin/python bench/scrub_quality.py
"""

from __future__ import annotations

import time
from pathlib import Path

from shitate.data.scrub import KINDS, Scrubber, measure
from shitate.memory import cpu_model

ASSETS = Path(__file__).resolve().parents[1] / "tests" / "assets"
HANDBOOK = Path(__file__).resolve().parents[2] / "shared" / "data" / "employee-handbook"


def main() -> None:
    print(f"CPU: {cpu_model()}")
    for name in ("pii-labelled.txt", "pii-heldout.txt"):
        lines = (ASSETS / name).read_text(encoding="utf-8").splitlines()
        started = time.perf_counter()
        scores = measure(lines)
        seconds = time.perf_counter() - started
        print(f"\n{name} ({sum(1 for text in lines if text.strip() and not text.startswith('#'))} lines, {seconds:.2f} s)")
        print(f"  {'kind':<10}{'labels':>7}{'found':>7}{'precision':>11}{'recall':>8}{'F1':>7}")
        for kind in (*KINDS, "all"):
            s = scores[kind]
            print(f"  {kind:<10}{s['tp'] + s['fn']:>7}{s['tp'] + s['fp']:>7}{s['precision']:>11.1%}{s['recall']:>8.1%}"
                  f"{s['f1']:>7.1%}")


    # False alarms on real text: a company's rules, which name no employee (only the authors' GitHub handles).
    if HANDBOOK.is_dir():
        scrubber = Scrubber()
        files = sorted(HANDBOOK.glob("*.md"))
        text = [line for f in files for line in f.read_text(encoding="utf-8").splitlines()]
        findings = [f for number, line in enumerate(text) for f in scrubber.find(line, number)]
        print(f"\n{HANDBOOK.name}: {len(files)} files, {sum(map(len, text)):,} characters → {len(findings)} findings")
        for finding in findings:
            print(f"  {finding.kind} {finding.text!r}")


if __name__ == "__main__":
    main()
