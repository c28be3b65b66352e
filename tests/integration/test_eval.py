"""`shitate eval` on a tiny run: report written, metrics computed, answers cached and reused."""

from __future__ import annotations

import json

import pytest
from test_train import make_recipe
from typer.testing import CliRunner

from conftest import SHARED_DATA
from shitate.cli import app
from shitate.errors import ShitateError

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
    assert runner.invoke(app, ["eval", str(trained_run), "--out", str(out)]).exit_code == 0
    (cache,) = out.glob("answers-base-*.jsonl")
    # As if a crash came after the first batch: only four answers of the base model were saved.
    cache.write_text("".join(json.dumps({"answer": f"保存済み{i}だよ。"}) + "\n" for i in range(4)), encoding="utf-8")
    assert runner.invoke(app, ["eval", str(trained_run), "--out", str(out)]).exit_code == 0
    answers = json.loads((out / "results.json").read_text(encoding="utf-8"))["answers"]["base"]
    assert answers[:4] == [f"保存済み{i}だよ。" for i in range(4)] and len(answers) == 8
    # Other generation settings are other answers: the cache is not reused for them.
    recipe = trained_run / "recipe.yaml"
    original = recipe.read_text(encoding="utf-8")
    recipe.write_text(original.replace("max_new_tokens: 12", "max_new_tokens: 11"), encoding="utf-8")
    try:
        assert runner.invoke(app, ["eval", str(trained_run), "--out", str(out)]).exit_code == 0
    finally:
        recipe.write_text(original, encoding="utf-8")
    answers = json.loads((out / "results.json").read_text(encoding="utf-8"))["answers"]["base"]
    assert not any(a.startswith("保存済み") for a in answers) and len(list(out.glob("answers-base-*.jsonl"))) == 2


@pytest.mark.skipif(not JGLUE.is_dir(), reason="shared JGLUE data not beside the checkout")
def test_jglue_tasks_run_on_a_model(tiny_model, tmp_path):
    result = runner.invoke(app, ["eval", str(tiny_model), "--tasks", "jcqa,jnli,jsts,jsquad,translation,summarization", "--limit", "6",
                                 "--jglue", str(JGLUE), "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    found = json.loads((tmp_path / "results.json").read_text(encoding="utf-8"))["metrics"]["model"]
    assert set(found) == {"jcommonsenseqa accuracy", "jnli accuracy", "jnli precision", "jnli recall", "jnli macro_f1",
                          "jsts pearson", "jsts spearman", "jsquad exact_match", "jsquad char_f1", "translation BLEU",
                          "translation chrF", "summarization ROUGE-1", "summarization ROUGE-2", "summarization ROUGE-L"}
    # Six questions each: accuracies are counts of six (the scoring itself is checked on known answers in
    # tests/unit/test_jglue.py); this run shows every task runs end to end on a real model and the real files.
    assert all((found[name] * 6) == pytest.approx(round(found[name] * 6)) for name in
               ("jcommonsenseqa accuracy", "jnli accuracy", "jsquad exact_match"))


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
            logprobs = model(input_ids=torch.tensor([full], device=model.device)).logits[0].float().log_softmax(-1)
        expected = sum(logprobs[t - 1, full[t]].item() for t in range(len(prompt), len(full)))
        assert score == pytest.approx(expected, abs=2e-2)  # bf16 inference


class FakeJudgeServer:
    """An OpenAI-compatible endpoint on localhost whose judge prefers answers that end in よ。"""

    def __enter__(self):
        import http.server
        import threading

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - the http.server API
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                prompt = body["messages"][0]["content"]
                if "[アシスタントAの回答]" in prompt:
                    a = prompt.split("[アシスタントAの回答]\n")[1].split("\n\n[")[0]
                    verdict = "勝者: A" if a.endswith("よ。") else "勝者: B"
                else:
                    verdict = "評価: 90" if prompt.split("[AIアシスタントの回答]\n")[-1].strip().endswith("よ。") else "評価: 10"
                reply = json.dumps({"choices": [{"message": {"role": "assistant", "content": verdict}}]}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def __exit__(self, *exc):
        self.server.shutdown()


def test_judges_over_an_endpoint_and_the_general_ability_check(trained_run, tmp_path):
    everyday = tmp_path / "everyday.jsonl"
    everyday.write_text("".join(json.dumps({"turns": [q]}, ensure_ascii=False) + "\n" for q in ("自己紹介して", "おすすめの本は?")),
                        encoding="utf-8")
    with FakeJudgeServer() as url:
        result = runner.invoke(app, ["eval", str(trained_run), "--out", str(tmp_path / "eval"), "--judge", url,
                                     "--general", "2", "--chat-bench", str(everyday)])
        assert result.exit_code == 0, result.output
        scored = runner.invoke(app, ["eval", str(trained_run), "--out", str(tmp_path / "scored"), "--judge", url,
                                     "--judge", url, "--judge-mode", "score"])
        assert scored.exit_code == 0, scored.output
    results = json.loads((tmp_path / "eval" / "results.json").read_text(encoding="utf-8"))
    combined = results["judge"]["combined"]
    assert combined["base"] + combined["tuned"] + combined["tie"] == 8 and combined["unparseable"] == 0
    assert sum(results["general"]["combined"].values()) == 2
    assert "General ability" in (tmp_path / "eval" / "report.html").read_text(encoding="utf-8")
    scores = json.loads((tmp_path / "scored" / "results.json").read_text(encoding="utf-8"))["judge"]
    assert scores["agreement"] == 1.0 and set(scores["combined"]) == {"base", "tuned"}
    # The fake judge gives 90 to an answer ending in よ。 and 10 to any other, and both judges agree.
    answers = json.loads((tmp_path / "scored" / "results.json").read_text(encoding="utf-8"))["answers"]
    for side, combined in scores["combined"].items():
        share = sum(a.strip().endswith("よ。") for a in answers[side]) / len(answers[side])
        assert combined["unparseable"] == 0 and combined["mean"] == pytest.approx(10 + 80 * share)


def test_an_unreachable_judge_fails_before_any_answer(trained_run, tmp_path):
    result = runner.invoke(app, ["eval", str(trained_run), "--out", str(tmp_path), "--judge", "http://127.0.0.1:9/v1"])
    assert isinstance(result.exception, ShitateError) and "could not be reached" in str(result.exception)
    assert not list(tmp_path.glob("answers-*.jsonl"))


def test_a_missing_metric_package_fails_before_any_answer(trained_run, tmp_path, monkeypatch):
    import sys

    from shitate.evals import metrics

    monkeypatch.setitem(sys.modules, "MeCab", None)  # sacrebleu without its [ja] extra
    monkeypatch.setattr(metrics, "_MECAB", None)
    result = runner.invoke(app, ["eval", str(trained_run), "--out", str(tmp_path)])
    assert isinstance(result.exception, ShitateError) and "sacrebleu[ja]" in str(result.exception)
    assert not list(tmp_path.glob("answers-*.jsonl"))


def test_a_local_model_can_judge_and_its_nonsense_is_counted(trained_run, tiny_model, tmp_path):
    """A tiny random model never writes 評価: N; every verdict is retried, then reported as unparseable."""
    result = runner.invoke(app, ["eval", str(trained_run), "--out", str(tmp_path), "--judge", str(tiny_model),
                                 "--judge-mode", "likert"])
    assert result.exit_code == 0, result.output
    judged = json.loads((tmp_path / "results.json").read_text(encoding="utf-8"))["judge"]
    (name,) = judged["judges"]
    assert name.endswith(str(tiny_model))
    for side in ("base", "tuned"):
        assert judged["combined"][side] == {"mean": None, "unparseable": 8}
        assert judged["per_judge"][side][name]["retried"] == 16  # two more tries for each of 8 answers


def test_an_ensemble_over_judge_prompts(trained_run, tmp_path):
    """Two prompts for one judge are two ensemble members, named by their prompt, with agreement reported."""
    from shitate.evals.judge import PROMPTS

    strict = tmp_path / "strict.txt"
    strict.write_text((PROMPTS / "score.txt").read_text(encoding="utf-8"), encoding="utf-8")
    lenient = tmp_path / "lenient.txt"
    lenient.write_text("甘めに採点してください。\n" + (PROMPTS / "score.txt").read_text(encoding="utf-8"), encoding="utf-8")
    with FakeJudgeServer() as url:
        result = runner.invoke(app, ["eval", str(trained_run), "--out", str(tmp_path / "eval"), "--judge", url,
                                     "--judge-mode", "score", "--judge-prompt", str(strict), "--judge-prompt", str(lenient)])
    assert result.exit_code == 0, result.output
    judged = json.loads((tmp_path / "eval" / "results.json").read_text(encoding="utf-8"))["judge"]
    assert [name.rsplit(" / ", 1)[1] for name in judged["judges"]] == [str(strict), str(lenient)]
    assert judged["agreement"] == 1.0  # the fake judge ignores the preamble: both prompts agree
