"""A killed data command never leaves a truncated file where a good one was (issue 12's crash safety for data)."""

from __future__ import annotations

import csv
import json
import os
import random
import signal
import subprocess
import sys
import time


def shitate(*args: str) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen([sys.executable, "-m", "shitate.cli", *args], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)


def test_killing_import_and_split_at_random_moments_leaves_the_old_file_or_the_new_one(tmp_path):
    source = tmp_path / "big.csv"
    with source.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["question", "answer"])
        writer.writerows([f"質問{i}はなんですか", f"答え{i}です。" * 3] for i in range(100_000))
    out, split = tmp_path / "all.jsonl", tmp_path / "split"
    out.write_text('{"messages": [{"role": "user", "content": "前の"}, {"role": "assistant", "content": "ファイル"}]}\n',
                   encoding="utf-8")
    old = out.read_bytes()
    assert shitate("data", "import", str(source), "--out", str(out), "--force").wait(timeout=120) == 0
    new = out.read_bytes()
    assert new.count(b"\n") == 100_000
    out.write_bytes(old)

    rng = random.Random(7)
    for attempt in range(8):
        process = shitate("data", "import", str(source), "--out", str(out), "--force")
        time.sleep(rng.uniform(0.3, 2.5))  # start-up, reading, writing, renaming: anywhere
        process.send_signal(signal.SIGKILL)
        process.wait()
        content = out.read_bytes()
        assert content in (old, new), f"attempt {attempt}: {len(content)} bytes, neither the old file nor the new"
        out.write_bytes(old)

    assert shitate("data", "import", str(source), "--out", str(out), "--force").wait(timeout=120) == 0
    assert out.read_bytes() == new and not list(tmp_path.glob(".all.jsonl.*.tmp"))  # killed writes' leftovers gone
    for attempt in range(4):
        process = shitate("data", "split", str(out), "--out-dir", str(split), "--force")
        time.sleep(rng.uniform(0.3, 2.0))
        process.send_signal(signal.SIGKILL)
        process.wait()
        for name in ("train", "validation", "test"):
            part = split / f"{name}.jsonl"
            if part.exists():  # written whole or not at all: every line a complete record
                lines = part.read_text(encoding="utf-8").splitlines()
                assert lines and all(json.loads(line)["messages"] for line in lines), (attempt, name)
