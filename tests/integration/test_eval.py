"""`shitate eval` on a tiny run: report written, metrics computed, answers cached and reused."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from conftest import SHARED_DATA
from shitate.cli import app
from shitate.errors import ShitateError
from test_train import make_recipe

runner = CliRunner()
JGLUE = SHARED_DATA / "jglue"


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, tiny_model):
    folder = tmp_path_factory.mktemp("eval-run")
    recipe = make_recipe(folder, tiny_model)
    assert runner.invoke(app, ["train", str(recipe), "--out", str(folder / "run"), "--set", "train.max_steps=2"]).exit_code == 0
    return folder / "run"


def test_eval_of_a_run_writes_a_before_after_report(trained_run):
    result = runner.invoke(app, ["eval", str(trained_run)])
    assert result.exit_code == 0, result.output
    results = json.loads((trained_run / "eval" / "results.json").read_text(encoding="utf-8"))
    assert results["sides"] == ["base", "tuned"]
    assert set(results["metrics"]["tuned"]) == {"chrF", "BLEU", "ROUGE-L", "char F1"}
    assert len(results["answers"]["base"]) == len(results["answers"]["tuned"]) == 8
    assert set(results["rubric"]["tuned"]) == {"yo"}
    html = (trained_run / "eval" / "report.html").read_text(encoding="utf-8")
    assert "<h2>Metrics</h2>" in html and "data:image/png;base64" in html and "<h2>Every answer</h2>" in html
    assert html.count("<tr>") >= 8 + 4


def test_cached_answers_are_reused_after_an_interruption(trained_run, tmp_path):
    out = tmp_path / "eval"
    out.mkdir()
    # As if a crash came after the first batch: four answers of the base model are already saved.
    (out / "answers-base.jsonl").write_text("".join(json.dumps({"answer": f"保存済み{i}だよ。"}) + "\n" for i in range(4)),
                                            encoding="utf-8")
    assert runner.invoke(app, ["eval", str(trained_run), "--out", str(out)]).exit_code == 0
    answers = json.loads((out / "results.json").read_text(encoding="utf-8"))["answers"]["base"]
    assert answers[:4] == [f"保存済み{i}だよ。" for i in range(4)] and len(answers) == 8


@pytest.mark.skipif(not JGLUE.is_dir(), reason="shared JGLUE data not beside the checkout")
def test_jglue_tasks_run_on_a_model(tiny_model, tmp_path):
    result = runner.invoke(app, ["eval", str(tiny_model), "--tasks", "jcqa,jnli,jsts,jsquad", "--limit", "6",
                                 "--jglue", str(JGLUE), "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    found = json.loads((tmp_path / "results.json").read_text(encoding="utf-8"))["metrics"]["model"]
    assert set(found) == {"jcommonsenseqa accuracy", "jnli accuracy", "jnli precision", "jnli recall", "jnli macro_f1",
                          "jsts pearson", "jsts spearman", "jsquad exact_match", "jsquad char_f1"}
    assert 0 <= found["jcommonsenseqa accuracy"] <= 1 and -1 <= found["jsts pearson"] <= 1


def test_bad_eval_requests_are_explained(tiny_model, tmp_path):
    result = runner.invoke(app, ["eval", str(tiny_model), "--tasks", "jmmlu", "--out", str(tmp_path)])
    assert isinstance(result.exception, ShitateError) and "unknown task(s) jmmlu" in str(result.exception)
    result = runner.invoke(app, ["eval", str(tiny_model)])
    assert isinstance(result.exception, ShitateError) and "nothing to evaluate" in str(result.exception)
    no_reference = tmp_path / "questions.jsonl"
    no_reference.write_text('{"prompt": "なんで空は青いの?"}\n', encoding="utf-8")
    result = runner.invoke(app, ["eval", str(tiny_model), "--test", str(no_reference), "--out", str(tmp_path)])
    assert isinstance(result.exception, ShitateError) and "without a reference answer" in str(result.exception)


def test_choice_logprobs_match_a_direct_computation(tiny_model):
    """The batched, answer-positions-only scorer equals log-softmax over the model's full logits."""
    import torch

    from shitate.models.inference import choice_logprobs, load_for_inference

    loaded = load_for_inference(str(tiny_model))
    scores = choice_logprobs(loaded, ["質問: 空は何色?\n答え:"], [["青", "赤い色"]], batch_size=2)
    tokenizer, model = loaded.tokenizer, loaded.model
    for choice, score in zip(["青", "赤い色"], scores[0]):
        prompt = tokenizer("<bos>質問: 空は何色?\n答え:", add_special_tokens=False)["input_ids"]
        full = tokenizer("<bos>質問: 空は何色?\n答え:" + choice, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logprobs = model(input_ids=torch.tensor([full])).logits[0].float().log_softmax(-1)
        expected = sum(logprobs[t - 1, full[t]].item() for t in range(len(prompt), len(full)))
        assert score == pytest.approx(expected, abs=2e-2)  # bf16 inference
