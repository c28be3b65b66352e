"""Multiple-choice evaluation speed: shitate's JCommonsenseQA scorer against lm-eval's harness.

Same model (the default Gemma 3 270M on the CPU, bf16 or fp32), same questions from
../shared/data/jglue/jcommonsenseqa-valid.json, same zero-shot prompt and answer log-likelihood
(sum over the choice's tokens, BOS first). Models are loaded before the clocks start; each clock
covers tokenisation and scoring. Prints questions per second, accuracy and the ratio.

    .venv/bin/pip install -e '.[bench]'
    .venv/bin/python bench/eval_throughput.py --questions 300
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
JCQA = REPO.parent / "shared" / "data" / "jglue" / "jcommonsenseqa-valid.json"
TASK = """task: jcqa_shitate_bench
dataset_path: json
dataset_kwargs:
  data_files:
    validation: {path}
validation_split: validation
output_type: multiple_choice
doc_to_text: "質問: {{{{question}}}}\\n答え:"
doc_to_choice: "{{{{[choice0, choice1, choice2, choice3, choice4]}}}}"
doc_to_target: label
target_delimiter: ""
metric_list:
  - metric: acc
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--questions", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=20,
                        help="questions per forward pass (lm-eval: their 5 × as many choice sequences)")
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

    import lm_eval
    import torch
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from shitate.evals.tasks import jglue
    from shitate.models.inference import choice_logprobs, load_for_inference

    dtype = getattr(torch, args.dtype)
    ours = load_for_inference("gemma-3-270m", dtype=dtype)
    rows = jglue.load_jcommonsenseqa(JCQA.parent, args.questions)
    started = time.perf_counter()
    result = jglue.run_jcommonsenseqa(ours, rows, logprobs=lambda m, p, c: choice_logprobs(m, p, c, args.batch_size))
    our_seconds = time.perf_counter() - started

    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / "task.yaml").write_text(TASK.format(path=JCQA), encoding="utf-8")
        harness = HFLM(pretrained=ours.source.folder, dtype=dtype, add_bos_token=True, device="cpu",
                       batch_size=5 * args.batch_size)
        started = time.perf_counter()
        theirs = lm_eval.simple_evaluate(model=harness, tasks=["jcqa_shitate_bench"], limit=args.questions,
                                         task_manager=TaskManager(include_path=folder), verbosity="ERROR")
        their_seconds = time.perf_counter() - started
    their_accuracy = theirs["results"]["jcqa_shitate_bench"]["acc,none"]

    print(f"JCommonsenseQA, {len(rows)} questions × 5 choices, Gemma 3 270M {args.dtype}, "
          f"{args.batch_size} questions a forward pass")
    print(f"{'side':<10} {'questions/s':>12} {'accuracy':>9}")
    print(f"{'shitate':<10} {len(rows) / our_seconds:>12.1f} {result.metrics['accuracy']:>9.4f}")
    print(f"{'lm-eval':<10} {len(rows) / their_seconds:>12.1f} {their_accuracy:>9.4f}")
    print(f"shitate / lm-eval: {their_seconds / our_seconds:.2f}× the questions per second; "
          f"accuracy difference {result.metrics['accuracy'] - their_accuracy:+.4f}")


if __name__ == "__main__":
    main()
