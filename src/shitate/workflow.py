"""What the command line and the web UI both do, as plain functions: train a recipe, check a data file,
evaluate a run. Each front end only gathers arguments and shows results, so the UI shows what the terminal shows.

Here, not in a stage, because a stage must not depend on another: the RL stages take the evaluation rubric
as their reward, and SFT's in-training answer check is the evaluation's, so both are injected from here.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from shitate.config import Recipe

if TYPE_CHECKING:
    from shitate.data.tokens import Estimate
    from shitate.train.session import DryRun


def train_recipe(recipe: Recipe, out: Path | None = None, resume: bool = False, force: bool = False,
                 dry_run: bool = False) -> Path | DryRun:
    """Run the recipe's stage; return the run folder (a dry run: what it measured)."""
    from shitate.config import PAIR_STAGES, RL_STAGES

    if recipe.stage in RL_STAGES:
        from shitate.evals.rubric import reward
        from shitate.train import rl

        rubric = reward(recipe.eval.rubric) if recipe.eval.rubric else None
        return rl.run(recipe, out=out, resume=resume, force=force, dry_run=dry_run, rubric_reward=rubric)
    if recipe.stage in PAIR_STAGES:
        from shitate.train import preference

        return preference.run(recipe, out=out, resume=resume, force=force, dry_run=dry_run)
    if recipe.stage == "pretrain":
        from shitate.train import pretrain

        return pretrain.run(recipe, out=out, resume=resume, force=force, dry_run=dry_run)
    from shitate.train import sft

    check = None
    if recipe.eval.every_steps:
        from shitate.evals.evaluate import answers_check

        check = answers_check(recipe)
    return sft.run(recipe, out=out, resume=resume, force=force, dry_run=dry_run, answers_check=check)


def check_data(file: Path, model: str | None = "gemma-3-270m", template: str = "auto", max_length: int = 512,
               system: str | None = None) -> tuple[Any, str]:
    """Validate a data file: (report, kind) with kind chats, pairs or text. Token counts need a model's tokenizer
    (`model` None skips them)."""
    from shitate.data.preference import check_preference_file, looks_like_preferences
    from shitate.data.validate import check_file, check_text_file, is_text_data

    text, pairs = is_text_data(file), looks_like_preferences(file)
    tokenizer = chat_template = None
    if model is not None:
        from shitate.data.templates import get_template
        from shitate.models.load import load_tokenizer, resolve

        source = resolve(model)
        tokenizer = load_tokenizer(source)
        config = Path(source.folder) / "config.json"  # a hub model's family is not looked up over the network
        model_type = json.loads(config.read_text(encoding="utf-8")).get("model_type") if config.is_file() else None
        chat_template = None if text else get_template(template, tokenizer, model_type)
    if text:
        return check_text_file(file, tokenizer, max_length), "text"
    if pairs:
        return check_preference_file(file, tokenizer, chat_template, max_length, system), "pairs"
    return check_file(file, tokenizer, chat_template, max_length, system), "chats"


def evaluate_target(target: str, tasks: Sequence[str] = (), limit: int | None = None, test: Path | None = None,
                    jglue: Path = Path("../shared/data/jglue"), out: Path | None = None, judges: Sequence[str] = (),
                    judge_mode: str = "pairwise", judge_prompts: Sequence[Path] = (), general: int = 0,
                    chat_bench: Path = Path("../shared/data/chat-bench/rakuda-v2-ja.jsonl"),
                    pairs: Path | None = None) -> Path:
    """Evaluate a run (base vs tuned) or one model; return the folder with results.json and report.html."""
    from shitate.data.formats import read_questions
    from shitate.data.preference import looks_like_preferences, read_preferences
    from shitate.errors import ShitateError
    from shitate.evals.evaluate import general_questions, run
    from shitate.runs import RunFolder

    run_folder = RunFolder(target) if RunFolder(target).is_finished() else None
    recipe = run_folder.recipe() if run_folder else None
    if run_folder and recipe:
        sides = [("base", recipe.model), ("tuned", target)]
        test = test or recipe.data.test
    else:
        sides = [("model", target)]
    if test and looks_like_preferences(test):  # a preference stage's test file is pairs, not questions
        pairs, test = pairs or test, None
    if not tasks and not test and not general and not pairs:
        raise ShitateError("nothing to evaluate: give --tasks (e.g. --tasks jcqa,jnli), a --test file or --pairs, "
                           "or a run folder whose recipe has data.test")
    items = read_questions(test, recipe.data.system if recipe else None) if test else []
    preference_pairs = [pair for _, pair in read_preferences(pairs)] if pairs else []
    out_dir = out or (run_folder.eval_dir if run_folder else Path("eval"))
    if judge_mode not in ("pairwise", "score", "likert"):
        raise ShitateError(f"--judge-mode {judge_mode!r}: expected pairwise, score or likert")
    everyday = general_questions(chat_bench, general) if general else []
    run(sides, out_dir, recipe, items, list(tasks), jglue, limit, template=recipe.template if recipe else "auto",
        judges=list(judges), judge_mode=judge_mode, judge_prompts=list(judge_prompts), general=everyday,
        pairs=preference_pairs)
    return out_dir


def estimate_data(file: Path, recipe: Recipe, shots: int = 5, prices: Path | None = None,
                  measure: bool = True) -> tuple[Any, list[Estimate], str, DryRun | None]:
    """Tokens of a data file under the recipe's model and template, what hosted fine-tuning would charge for
    it, and (measure) the training time on this machine from a dry run of the recipe on this file."""
    from shitate.data.tokens import Usage, estimate, load_prices
    from shitate.errors import DataError

    report, kind = check_data(file, recipe.model, recipe.template, recipe.train.max_length, recipe.data.system)
    if report.errors:
        raise DataError(report.errors)
    clipped = [min(length, recipe.train.max_length) for length in report.lengths]
    records = max(report.records, 1)
    prompt = (report.tokens["system"] + report.tokens["user"]) / records
    usage = Usage(report.records, sum(clipped), recipe.train.epochs, prompt, report.tokens["assistant"] / records,
                  shots if kind == "chats" else 0)
    services, as_of = load_prices(prices)
    measured = None
    if measure:  # a dry run trains in a temporary folder of its own: runs/<name> is not touched
        data = recipe.data.model_copy(update={"train": file})
        from shitate.train.session import DryRun

        report_of_two_steps = train_recipe(recipe.model_copy(update={"data": data}), dry_run=True)
        measured = report_of_two_steps if isinstance(report_of_two_steps, DryRun) else None
    return usage, estimate(usage, services) if kind == "chats" else [], as_of, measured


def synth_generator(reference: str, max_new_tokens: int = 160) -> Any:
    """`data synth --mode model`'s generator: an OpenAI-compatible URL asked with the prompt as a user message, or a
    model shitate loads continuing the few-shot prompt greedily, cut where it starts another passage."""
    if reference.startswith(("http://", "https://")):
        from shitate.evals.judge import endpoint_judge

        return endpoint_judge(reference)
    from shitate.config import GenerateSpec
    from shitate.data.synth import until_next_passage
    from shitate.models.inference import continue_texts, load_for_inference

    loaded = load_for_inference(reference)
    spec = GenerateSpec(max_new_tokens=max_new_tokens, batch_size=8, temperature=0.0, repetition_penalty=1.05)
    return lambda prompts: [until_next_passage(text) for text in continue_texts(loaded, prompts, spec)]
