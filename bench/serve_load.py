"""Serving load: `shitate serve` under concurrent chat requests against one-at-a-time `generate`.

The server runs in its own process; this process plays 1, 8 and 32 users over loopback, each
sending its requests one after another (greedy, or sampled with --temperature; the same max_tokens), and prints generated
tokens/s, p50/p95 latency and failed requests per level. The baseline, in the same run once
the server has stopped: the same model, loaded the same way, answering the same questions one
at a time with transformers' `generate` — what a server without batching does.

    .venv/bin/pip install -e '.[serve]'
    .venv/bin/python bench/serve_load.py                       # the default model, 1/8/32 users
    .venv/bin/python bench/serve_load.py --model runs/kids-qa --users 1,8
    .venv/bin/python bench/serve_load.py --temperature 1.0 --top-p 0.95   # sampled requests
    .venv/bin/python bench/serve_load.py --request '{"repetition_penalty": 1.3}'   # decoded beside the batch
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
from train_throughput import cpu_model  # noqa: E402


def questions(count: int) -> list[str]:
    rows = [json.loads(line) for line in (REPO / "examples/kids_qa/data/test.jsonl").read_text().splitlines()]
    asked = [next(m["content"] for m in r["messages"] if m["role"] == "user") for r in rows]
    return [asked[i % len(asked)] for i in range(count)]


def ask(url: str, question: str, max_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
        extra: dict | None = None) -> tuple[float, int]:
    body = json.dumps({"model": "bench", "messages": [{"role": "user", "content": question}],
                       "temperature": temperature, "top_p": top_p, "max_tokens": max_tokens, **(extra or {})}).encode()
    request = urllib.request.Request(f"{url}/v1/chat/completions", data=body,
                                     headers={"Content-Type": "application/json"})
    started = time.perf_counter()
    with urllib.request.urlopen(request, timeout=600) as response:
        reply = json.loads(response.read())
    return time.perf_counter() - started, reply["usage"]["completion_tokens"]


def load_level(url: str, users: int, per_user: int, max_tokens: int, temperature: float, top_p: float,
               extra: dict) -> dict:
    asked = questions(users * per_user)

    def user(index: int) -> list[tuple[float, int] | None]:
        results: list[tuple[float, int] | None] = []
        for k in range(per_user):
            try:
                results.append(ask(url, asked[index * per_user + k], max_tokens, temperature, top_p, extra))
            except Exception:  # noqa: BLE001 — a failed request is counted, not fatal
                results.append(None)
        return results

    started = time.perf_counter()
    with ThreadPoolExecutor(users) as pool:
        done = [r for rs in pool.map(user, range(users)) for r in rs]
    wall = time.perf_counter() - started
    ok = [r for r in done if r is not None]
    latencies = sorted(r[0] for r in ok)
    return {"users": users, "requests": len(done), "failed": len(done) - len(ok),
            "tokens_per_s": sum(r[1] for r in ok) / wall, "p50_s": statistics.median(latencies),
            "p95_s": latencies[min(len(latencies) - 1, round(0.95 * (len(latencies) - 1)))]}


def sequential(model: str, count: int, max_tokens: int, temperature: float, top_p: float,
               repetition_penalty: float = 1.0) -> dict:
    """One request at a time through transformers' generate (run in a child process, after the server stopped)."""
    code = f"""
import json, time
from shitate.config import GenerateSpec
from shitate.models.inference import answer, load_for_inference
loaded = load_for_inference({model!r})
spec = GenerateSpec(max_new_tokens={max_tokens}, temperature={temperature}, top_p={top_p}, batch_size=1,
                    repetition_penalty={repetition_penalty})
questions = {questions(count)!r}
answer(loaded, [[{{"role": "user", "content": questions[0]}}]], spec)  # warm-up, as the server had
tokens, latencies = 0, []
started = time.perf_counter()
for q in questions:
    t = time.perf_counter()
    text = answer(loaded, [[{{"role": "user", "content": q}}]], spec)[0]
    latencies.append(time.perf_counter() - t)
    tokens += len(loaded.tokenizer(text, add_special_tokens=False)["input_ids"])
print(json.dumps({{"tokens_per_s": tokens / (time.perf_counter() - started), "latencies": latencies}}))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    latencies = sorted(result["latencies"])
    return {"tokens_per_s": result["tokens_per_s"], "p50_s": statistics.median(latencies), "p95_s": latencies[-1]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="gemma-3-270m")
    parser.add_argument("--users", default="1,8,32")
    parser.add_argument("--per-user", type=int, default=2, help="requests each user sends, one after another")
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy; above: sampled requests")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--request", default="{}", help="JSON fields added to every request, e.g. "
                        "'{\"logprobs\": true}' (the baseline applies a repetition_penalty given here too)")
    parser.add_argument("--serve-args", default="", help="extra options for shitate serve, e.g. '--cache-tokens 8192'")
    parser.add_argument("--no-baseline", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    extra = json.loads(args.request)

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, "-m", "shitate.cli", "serve", f"bench={args.model}", "--port", str(port),
                               *args.serve_args.split()],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    try:
        for _ in range(600):
            try:
                urllib.request.urlopen(f"{url}/health", timeout=1)
                break
            except OSError:
                if server.poll() is not None:
                    sys.exit(f"the server stopped: {server.stderr.read().decode()[-2000:] if server.stderr else ''}")
                time.sleep(0.5)
        ask(url, questions(1)[0], 4, args.temperature, args.top_p, extra)  # warm-up (a sampled request starts its batcher)
        levels = [load_level(url, int(n), args.per_user, args.max_tokens, args.temperature, args.top_p, extra)
                  for n in args.users.split(",")]
    finally:
        server.terminate()
        server.wait(timeout=60)
    if args.no_baseline:
        print(json.dumps(levels))
        return
    baseline = sequential(args.model, 8 * args.per_user, args.max_tokens, args.temperature, args.top_p,
                          extra.get("repetition_penalty", 1.0))

    decoding = "greedy" if args.temperature <= 0 else f"sampled (temperature {args.temperature}, top-p {args.top_p})"
    print(f"\nCPU: {cpu_model()}; model {args.model}; {decoding}, max_tokens {args.max_tokens}, "
          f"{args.per_user} requests a user" + (f"; each request with {args.request}" if extra else ""))
    print(f"{'':<26}{'tokens/s':>10}{'p50 s':>9}{'p95 s':>9}{'failed':>8}{'vs one at a time':>18}")
    print(f"{'generate, one at a time':<26}{baseline['tokens_per_s']:>10.1f}{baseline['p50_s']:>9.2f}"
          f"{baseline['p95_s']:>9.2f}{'':>8}{1.0:>17.2f}×")
    for level in levels:
        print(f"{'shitate serve, ' + str(level['users']) + ' users':<26}{level['tokens_per_s']:>10.1f}"
              f"{level['p50_s']:>9.2f}{level['p95_s']:>9.2f}{level['failed']:>8}"
              f"{level['tokens_per_s'] / baseline['tokens_per_s']:>17.2f}×")


if __name__ == "__main__":
    main()
