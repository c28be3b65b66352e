"""The `shitate` command. Each verb imports its stage inside the function, so --help stays instant."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import typer

app = typer.Typer(help="Tailor an open LLM to your own data, privately, on your own machines.",
                  no_args_is_help=True, pretty_exceptions_show_locals=False, add_completion=False)


@app.callback()
def _options(allow_pickle: bool = typer.Option(False, "--allow-pickle",
                                               help="load .bin/.pt weights (pickle can run code: only files you trust)")
             ) -> None:
    import os

    if allow_pickle:
        os.environ["SHITATE_ALLOW_PICKLE"] = "1"


data_app = typer.Typer(help="Import, check and split training data.", no_args_is_help=True)
app.add_typer(data_app, name="data")

MODEL_HELP = "gemma-3-270m (the default), a model folder, a .gguf file, a run folder, or a hub id"


@data_app.command("import")
def data_import(
    source: Path = typer.Argument(..., help="CSV/TSV/Excel (.xlsx); JSONL, a JSON array or Parquet in chat, alpaca, dolly, "
                                            "sharegpt or prompt/completion form; or a .txt/.md file or folder (→ text "
                                            "JSONL for stage pretrain); "
                                            "or preference data: prompt/chosen/rejected, ranked answers, pairwise "
                                            "judgment files or a folder of them (→ preference JSONL)"),
    out: Path = typer.Option(..., "--out", "-o", help="canonical chat JSONL to write"),
    format: str = typer.Option("auto", help="auto, chat, alpaca, dolly, sharegpt, prompt-completion, csv, tsv, xlsx, text; "
                                             "preference pairs: preference, ranked, judgment"),
    system: str | None = typer.Option(None, help="system prompt to put before every conversation"),
    question_column: str | None = typer.Option(None, help="CSV/TSV column with the user's words (default: question, "
                                                           "or a usual Japanese header such as 質問 or 入力)"),
    answer_column: str | None = typer.Option(None, help="CSV/TSV column with the answer to learn (default: answer, "
                                                         "or a usual Japanese header such as 回答 or 答え)"),
    skip_bad: bool = typer.Option(False, help="write the good records (or files) and list the bad ones instead of "
                                              "stopping"),
    max_chars: int = typer.Option(800, help="documents: longest passage in characters (0: one passage per section)"),
    overlap: int = typer.Option(100, help="documents: characters of whole sentences a long section's next passage "
                                          "repeats"),
    encoding: str | None = typer.Option(None, help="the file's encoding, e.g. cp932 (default: UTF-8; CSV/TSV: "
                                                      "UTF-8, cp932 or EUC-JP, detected)"),
    force: bool = typer.Option(False, help="overwrite OUT if it exists"),
) -> None:
    """Convert a data file to shitate's chat JSONL, documents to passages split by heading and article (text JSONL
    with source and heading, for pretrain and `data synth`), or
    preference data to prompt/chosen/rejected pairs (for reward, dpo, orpo)."""
    from shitate.data.documents import DOCUMENT_SUFFIXES, import_documents
    from shitate.data.formats import FORMATS, import_records, write_jsonl
    from shitate.data.preference import PREFERENCE_FORMATS, import_preferences, looks_like_preferences
    from shitate.data.text import read_documents
    from shitate.errors import DataError, ShitateError
    from shitate.progress import counted, say

    known = FORMATS + ("text",) + PREFERENCE_FORMATS
    if format not in known:
        raise ShitateError(f"--format {format!r}: expected one of {', '.join(known)}")
    _refuse_overwrite(out, force)
    if format in PREFERENCE_FORMATS or (format == "auto" and looks_like_preferences(source)):
        pairs, problems, without_pair = import_preferences(source, format)
        if problems and not skip_bad:
            raise DataError(problems)
        for problem in problems:
            say(f"[yellow]skipped[/] {problem}")
        if not pairs:
            raise ShitateError(f"{source}: no preference pairs found ({without_pair} records gave none, e.g. ties or "
                               "judgments whose two answer orders disagree)")
        count = write_jsonl(out, pairs)
        unpaired = (f"; {counted(without_pair, 'record')} gave no pair (a tie, or the two judgment orders disagree)"
                    if without_pair else "")
        say(f"Wrote {counted(count, 'preference pair')} to {out}{unpaired}"
            + (f"; {len(problems)} skipped" if problems else "") + ".")
        return
    if format == "text" and not source.is_dir() and source.suffix.lower() not in DOCUMENT_SUFFIXES:
        documents = read_documents(source)  # a text JSONL, checked and rewritten
        count = write_jsonl(out, ({"text": d.text, "source": d.source} for d in documents))
        say(f"Wrote {counted(count, 'text record')} to {out} (for stage pretrain).")
        return
    if format in ("text", "auto") and (source.is_dir() or source.suffix.lower() in DOCUMENT_SUFFIXES):
        found, problems, files = import_documents(source, max_chars, overlap, skip_bad)
        for problem in problems:
            say(f"[yellow]skipped[/] {problem}")
        count = write_jsonl(out, (p.record() for p in found))
        say(f"Wrote {counted(count, 'passage')} from {files - len(problems)} of {counted(files, 'file')} to {out} "
            "(text records: stage pretrain reads them, `shitate data synth` makes questions from them)."
            + (f" {counted(len(problems), 'file')} skipped." if problems else ""))
        return
    records, skipped = import_records(source, format, system, question_column, answer_column, skip_bad, encoding)
    for problem in skipped:
        say(f"[yellow]skipped[/] {problem}")
    count = write_jsonl(out, records)
    say(f"Wrote {counted(count, 'conversation')} to {out}" + (f" ({len(skipped)} skipped)" if skipped else "") + ".")


@data_app.command("check")
def data_check(
    file: Path = typer.Argument(..., help="chat JSONL, preference JSONL (prompt/chosen/rejected), or raw text (text "
                                          "JSONL, a .txt/.md file or folder) to validate"),
    model: str = typer.Option("gemma-3-270m", help=f"tokenizer for token counts and length checks: {MODEL_HELP}"),
    template: str = typer.Option("auto", help="chat template: auto, gemma, chatml, llama3, plain"),
    max_length: int = typer.Option(512, help="warn about examples (or documents: the block size) longer than this"),
    system: str | None = typer.Option(None, help="system prompt that training will add"),
    tokens: bool = typer.Option(True, help="count tokens (loads the model's tokenizer)"),
    against: Path | None = typer.Option(None, help="a test file: flag training records that repeat (error) or "
                                                      "nearly repeat (warning) one of its questions"),
    threshold: float = typer.Option(0.8, min=0.1, max=1.0, help="--against: similarity from which a question nearly "
                                                                "repeats (character 3-gram Jaccard)"),
) -> None:
    """List every problem of a data file (file:line: field: what — fix) and its statistics; chats or raw text."""
    from shitate.data.validate import histogram
    from shitate.progress import console, counted
    from shitate.workflow import check_data

    report, kind = check_data(file, model if tokens else None, template, max_length, system)
    if against is not None:
        from shitate.data.dedupe import leakage_problems

        leaked, near = leakage_problems(file, against, threshold)
        report.errors += leaked
        report.warnings += near
    text, pairs = kind == "text", kind == "pairs"
    for problem in report.errors:
        console.print(f"[red]error[/] {problem}", highlight=False)
    for problem in report.warnings:
        console.print(f"[yellow]warning[/] {problem}", highlight=False)
    kind_noun = "document" if text else "pair" if pairs else "conversation"
    console.print(f"\n[bold]{file}[/]: {counted(report.records, 'valid ' + kind_noun)}, "
                  f"{counted(len(report.errors), 'error')}, {counted(len(report.warnings), 'warning')}, "
                  f"{report.duplicates} repeated.")
    if report.turns:
        console.print("turns by role: " + ", ".join(f"{role} {n}" for role, n in sorted(report.turns.items())))
    if report.tokens:
        console.print("tokens by role: " + ", ".join(f"{role} {n}" for role, n in sorted(report.tokens.items())))
        lengths = report.lengths
        console.print(f"tokens per {'pair' if pairs else 'example'} (with template): min {min(lengths)}, "
                      f"mean {sum(lengths) / len(lengths):.0f}, "
                      f"max {max(lengths)}, total {sum(lengths)}")
        peak = max(count for _, _, count in histogram(lengths))
        for low, high, count in histogram(lengths):
            console.print(f"  {low:>6}–{high:<6} {'█' * max(1 if count else 0, round(30 * count / peak))} {count}")
    if report.errors:
        raise typer.Exit(1)


@data_app.command("split")
def data_split(
    file: Path = typer.Argument(..., help="chat or preference JSONL to split"),
    sizes: str = typer.Option("0.8/0.1/0.1", help="train/validation/test as counts (70/30/30) or fractions"),
    out_dir: Path = typer.Option(..., "--out-dir", "-o", help="folder for train.jsonl, validation.jsonl, test.jsonl"),
    seed: int = typer.Option(42, help="shuffle seed: the same seed gives the same split"),
    force: bool = typer.Option(False, help="overwrite existing split files"),
) -> None:
    """Seeded train/validation/test split; a repeated question (or a prompt's pairs) never lands in two splits."""
    from shitate.data.formats import read_chat, write_jsonl
    from shitate.data.split import SPLITS, parse_sizes, question_group, split_records
    from shitate.progress import say

    for name in SPLITS:
        _refuse_overwrite(out_dir / f"{name}.jsonl", force)
    from shitate.data.preference import looks_like_preferences, read_preferences

    wanted = parse_sizes(sizes)
    records = [pair for _, pair in read_preferences(file)] if looks_like_preferences(file) else [
        record for _, record in read_chat(file)]
    parts = split_records(records, wanted, seed)
    for name in SPLITS:
        write_jsonl(out_dir / f"{name}.jsonl", parts[name])
    used = sum(len(p) for p in parts.values())
    say(f"{file}: {len(records)} records → " + ", ".join(f"{n} {len(parts[n])}" for n in SPLITS)
        + (f" ({len(records) - used} not used)" if used < len(records) else "") + f" in {out_dir}/")
    if empty := [n for n, size in zip(SPLITS, wanted) if size > 0 and not parts[n]]:
        say(f"[yellow]warning[/] {' and '.join(empty)} got no records: {len(records)} records in "
            f"{len({question_group(r) for r in records})} groups of repeated questions or shared passages are too few "
            "for these sizes. Give counts (--sizes 7/1/1) or add data.")


@data_app.command("synth")
def data_synth(
    passages: Path = typer.Argument(..., help="passages (text JSONL from `data import DOCS/`), or the documents "
                                              "themselves: a folder or a .md/.txt/.html/.pdf/.docx file"),
    out: Path = typer.Option(..., "--out", "-o", help="chat JSONL of question/answer pairs, each with its passage "
                                                      "as context"),
    mode: str = typer.Option("template", help="template: questions from articles and headings, no model; model: a "
                                              "generator writes them"),
    generator: str = typer.Option("gemma-3-270m", help=f"model mode: {MODEL_HELP}, or an OpenAI-compatible URL "
                                                        "(http://host:port/v1[#model])"),
    prompt: Path | None = typer.Option(None, help="model mode: your own copy of the few-shot prompt "
                                                     "({passage} is replaced); default data/prompts/synth_qa.txt"),
    per_passage: int = typer.Option(3, min=1, help="model mode: most pairs kept from one passage"),
    min_support: float = typer.Option(0.6, min=0, max=1, help="drop answers whose character bigrams are less than "
                                                              "this share in their passage"),
    max_answer_chars: int = typer.Option(1000, help="drop longer answers"),
    limit: int | None = typer.Option(None, help="only the first N passages (try a prompt quickly)"),
    force: bool = typer.Option(False, help="overwrite OUT if it exists"),
) -> None:
    """Write question/answer pairs grounded in passages, filtered (unsupported answers, duplicates, answers
    given away by their question, empty or over-long), with a count of each filter."""
    from shitate.data.documents import DOCUMENT_SUFFIXES, import_documents, read_passages
    from shitate.data.formats import write_jsonl
    from shitate.data.synth import SynthFilters, synthesize
    from shitate.errors import ShitateError
    from shitate.progress import say, work_bar
    from shitate.workflow import synth_generator

    if mode not in ("template", "model"):
        raise ShitateError(f"--mode {mode!r}: expected template or model")
    _refuse_overwrite(out, force)
    if passages.is_dir() or passages.suffix.lower() in DOCUMENT_SUFFIXES:
        records = [p.record() for p in import_documents(passages)[0]]
    else:
        records = read_passages(passages)
    records = records[:limit] if limit else records
    ask = synth_generator(generator) if mode == "model" else None
    template = prompt.read_text(encoding="utf-8") if prompt else None
    with work_bar() as bar:
        task = bar.add_task("writing questions", total=len(records))
        pairs, report = synthesize(records, mode, ask, per_passage, template,
                                   SynthFilters(min_support=min_support, max_answer_chars=max_answer_chars),
                                   on_batch=lambda n: bar.advance(task, n))
    if not pairs:
        raise ShitateError(f"{passages}: no question/answer pair passed the filters ({'; '.join(report.lines())}). "
                           + ("Template mode needs passages with headings or articles; try --mode model."
                              if mode == "template" else "Try a larger generator, or edit the prompt."))
    write_jsonl(out, pairs)
    for line in report.lines():
        say(line)
    say(f"Wrote {len(pairs)} question/answer pairs to {out}.")


@data_app.command("scrub")
def data_scrub(
    file: Path = typer.Argument(..., help="a JSONL (every string in each record) or a text file"),
    out: Path | None = typer.Option(None, "--out", "-o", help="the masked copy to write"),
    dry_run: bool = typer.Option(False, help="list what would be masked, write nothing"),
    allow: list[str] = typer.Option([], help="text never to mask (a public phone number, the company's name); "
                                             "repeat it, or give @FILE with one per line"),
    names: bool = typer.Option(True, help="find person names with the Japanese dictionary (Janome)"),
    force: bool = typer.Option(False, help="overwrite OUT if it exists"),
) -> None:
    """Find and mask personal data — e-mail, phone, postal code, address, My Number, card number, person
    name — with the same placeholder for the same value in the file, and report each by line."""
    from shitate.data.formats import write_lines
    from shitate.data.scrub import Scrubber, scrub_lines
    from shitate.data.text import decode
    from shitate.errors import ShitateError
    from shitate.progress import say, work_bar

    if not dry_run and out is None:
        raise ShitateError("give --out FILE for the masked copy, or --dry-run to only list what would be masked")
    if out is not None and not dry_run:
        _refuse_overwrite(out, force)
    allowed = set()
    for item in allow:
        if item.startswith("@") and not Path(item[1:]).is_file():
            raise ShitateError(f"--allow {item}: file {item[1:]} not found (one allowed text a line)")
        allowed |= set(Path(item[1:]).read_text(encoding="utf-8").split("\n")) if item.startswith("@") else {item}
    scrubber = Scrubber(allow=frozenset(a.strip() for a in allowed if a.strip()), names=names)
    text, _ = decode(file)
    lines = text.split("\n")
    lines = lines[:-1] if lines and lines[-1] == "" else lines
    masked, total = [], dict[str, int]()
    with work_bar() as bar:
        task = bar.add_task("scrubbing", total=len(lines))
        for line, findings in scrub_lines(lines, scrubber, jsonl=file.suffix.lower() == ".jsonl", path=file):
            masked.append(line)
            bar.advance(task)
            for finding in findings:
                total[finding.kind] = total.get(finding.kind, 0) + 1
                bar.console.print(f"{file}:{finding.line}: {finding.kind} {finding.text!r} → {finding.mask}",
                                  highlight=False)
    summary = ", ".join(f"{kind} {count}" for kind, count in sorted(total.items())) or "nothing found"
    if dry_run or out is None:
        say(f"{file}: {summary} (dry run: nothing written).")
        return
    write_lines(out, masked)
    say(f"{file}: {summary}; masked copy in {out}.")


@data_app.command("dedupe")
def data_dedupe(
    file: Path = typer.Argument(..., help="chat, preference or text JSONL"),
    out: Path = typer.Option(..., "--out", "-o", help="the JSONL without repeats"),
    by: str = typer.Option("question", help="question: compare the user's turns (or prompt); record: the whole record"),
    threshold: float = typer.Option(0.8, min=0.1, max=1.0, help="character 3-gram Jaccard similarity from which two "
                                                                "records count as near duplicates (1.0: exact only)"),
    force: bool = typer.Option(False, help="overwrite OUT if it exists"),
) -> None:
    """Remove exact and near-duplicate records (MinHash/LSH), keeping the first of each; list each one removed."""
    from shitate.data.dedupe import dedupe_file
    from shitate.data.formats import write_jsonl
    from shitate.errors import ShitateError
    from shitate.progress import console, say

    if by not in ("question", "record"):
        raise ShitateError(f"--by {by!r}: expected question or record")
    _refuse_overwrite(out, force)
    kept, notes = dedupe_file(file, "question" if by == "question" else "all", threshold)
    for note in notes:
        console.print(f"[yellow]removed[/] {note}", highlight=False)
    write_jsonl(out, kept)
    say(f"{file}: {len(kept) + len(notes)} records → {len(kept)} in {out} ({len(notes)} repeats removed).")


@data_app.command("estimate")
def data_estimate(
    data: Path = typer.Argument(..., help="the training data (chat, preference or text JSONL)"),
    recipe: Path = typer.Option(..., "--recipe", "-r", help="the recipe you will train with (model, template, "
                                                           "epochs, max_length)"),
    set_: list[str] = typer.Option([], "--set", help="override a recipe setting, e.g. train.epochs=1"),
    shots: int = typer.Option(5, min=0, help="examples a few-shot prompt would carry instead of tuning"),
    requests: int = typer.Option(10_000, min=0, help="requests to price"),
    prices: Path | None = typer.Option(None, help="your copy of the price table (default: shitate's "
                                                     "data/prices.yaml)"),
    measure: bool = typer.Option(True, help="time two training steps on this machine to project the run"),
) -> None:
    """Token counts with the model's tokenizer, the training time on this machine (measured, not assumed), the
    cost at hosted fine-tuning prices, and the break-even against few-shot prompting of an untuned model."""
    from shitate.config import load_recipe
    from shitate.data.tokens import PRICES
    from shitate.memory import cpu_model
    from shitate.progress import console
    from shitate.workflow import estimate_data

    usage, estimates, as_of, measured = estimate_data(data, load_recipe(recipe, set_), shots, prices, measure)
    console.print(f"[bold]{data}[/]: {usage.examples} examples, {usage.tokens_per_epoch:,} tokens an epoch "
                  f"(model's tokenizer, template included) × {usage.epochs} epochs = {usage.training_tokens:,} "
                  "training tokens", highlight=False)
    if measured is not None:
        console.print(f"this machine ({cpu_model() if measured.device == 'cpu' else measured.device}, "
                      f"{measured.precision}): {measured.tokens_per_second:,.0f} tokens/s measured → about "
                      f"{measured.projected_seconds / 60:.1f} min for {measured.steps} steps", highlight=False)
    if not estimates:
        return
    console.print(f"\nhosted fine-tuning at list prices as of {as_of}, USD: training once, then {requests:,} requests "
                  f"of {usage.prompt_tokens:.0f} prompt + {usage.answer_tokens:.0f} answer tokens to the tuned model, "
                  f"or to the untuned one with {usage.shots} examples ({usage.few_shot_tokens:.0f} more prompt "
                  "tokens) in each prompt:", highlight=False)
    console.print(f"  {'service':<21}{'training':>9}{'tuned':>10}{'few-shot':>10}{'break-even':>14}", highlight=False)
    for e in estimates:
        even = e.break_even_requests
        console.print(f"  {e.service:<21}{e.training_cost:>9.2f}{e.tuned_per_request * requests:>10.2f}"
                      f"{e.few_shot_per_request * requests:>10.2f}"
                      f"{(f'{even:,.0f} req' if even is not None else 'never'):>14}", highlight=False)
    console.print(f"  on this machine: no fee, and the data never leaves it. Prices from {prices or PRICES}.",
                  highlight=False)


@app.command()
def train(
    recipe: Path = typer.Argument(..., help="recipe YAML (see examples/*/recipe.yaml)"),
    set_: list[str] = typer.Option([], "--set", help="override a setting, e.g. --set train.epochs=2 (repeatable)"),
    resume: bool = typer.Option(False, help="continue the run from its last checkpoint"),
    out: Path | None = typer.Option(None, help="run folder (default runs/NAME)"),
    force: bool = typer.Option(False, help="replace an existing run folder"),
    dry_run: bool = typer.Option(False, help="train two steps, report speed, memory and the projected time; keep nothing"),
    nproc: int = typer.Option(1, min=1, help="processes, data-parallel: one a GPU (accelerate launch), or CPU "
                                             "processes over gloo (torchrun)"),
    engine: str = typer.Option("ddp", help="with --nproc on GPUs: ddp, fsdp, fsdp-offload, zero2, zero3 (a file in "
                                           "configs/accelerate/), or your own accelerate config file"),
) -> None:
    """Fine-tune a model as the recipe says; writes a run folder."""
    from shitate.config import load_recipe
    from shitate.workflow import train_recipe

    if nproc > 1 and "RANK" not in os.environ:
        raise typer.Exit(_launch(nproc, engine))
    train_recipe(load_recipe(recipe, set_), out=out, resume=resume, force=force, dry_run=dry_run)


def _launch(nproc: int, engine: str) -> int:
    """Run this same command in `nproc` processes under accelerate's launcher (GPUs) or torchrun (CPU): the
    engines do the distributing; shitate only builds their command line. Returns the launcher's exit status."""
    import subprocess

    import torch

    from shitate.errors import ConfigError

    argv = sys.argv[1:]
    # The children run the same command without --nproc/--engine (and their values): they are the processes.
    args = [a for i, a in enumerate(argv) if a.split("=")[0] not in LAUNCH_OPTIONS
            and (i == 0 or argv[i - 1] not in LAUNCH_OPTIONS)]
    if not torch.cuda.is_available():
        # accelerate's own CPU launcher wants MPI for several processes; torchrun needs nothing.
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "-m", "shitate.cli"]
    else:
        config = Path(engine) if engine.endswith((".yaml", ".yml", ".json")) else ACCELERATE_CONFIGS / f"{engine}.yaml"
        if not config.is_file():
            known = ", ".join(sorted(p.stem for p in ACCELERATE_CONFIGS.glob("*.yaml")))
            raise ConfigError(f"--engine {engine}: no accelerate config {config}; expected one of {known} or a file")
        command = ["accelerate", "launch", "--config_file", str(config), "--num_processes", str(nproc),
                   "-m", "shitate.cli"]
    return subprocess.call(command + args)


LAUNCH_OPTIONS = ("--nproc", "--engine")
# Package data, so an installed wheel has them too; configs/accelerate/ in a checkout links here.
ACCELERATE_CONFIGS = Path(__file__).resolve().parent / "configs" / "accelerate"


@app.command()
def generate(
    model: str = typer.Argument(..., help=MODEL_HELP),
    prompt: str = typer.Argument(..., help="text to continue"),
    max_new_tokens: int = typer.Option(64),
    temperature: float = typer.Option(0.0, help="0 = greedy"),
    repetition_penalty: float = typer.Option(1.0, help="above 1 discourages repeating tokens: small models loop "
                                                       "under greedy decoding; 1.3 often stops it"),
) -> None:
    """Continue a text as the model sees it, with no chat template (how a base model answers)."""
    from shitate.config import GenerateSpec
    from shitate.models.inference import continue_text, load_for_inference

    loaded = load_for_inference(model)
    spec = GenerateSpec(max_new_tokens=max_new_tokens, temperature=temperature, repetition_penalty=repetition_penalty)
    text = continue_text(loaded, prompt, spec)
    typer.echo(prompt + text)


@app.command()
def chat(
    model: str = typer.Argument(..., help=MODEL_HELP),
    system: str | None = typer.Option(None, help="system prompt (a run folder brings the one it trained with; "
                                                 "--system '' for none)"),
    template: str = typer.Option("auto", help="chat template (a run folder brings its own)"),
    max_new_tokens: int = typer.Option(256),
    temperature: float = typer.Option(0.0, help="0 = greedy"),
) -> None:
    """Talk to a model in the terminal; answers stream as they are written. Ctrl-C stops an answer; an empty line
    or Ctrl-D quits."""
    from shitate.config import GenerateSpec
    from shitate.errors import ShitateError
    from shitate.models.inference import load_for_inference, stream_answer
    from shitate.progress import console

    loaded = load_for_inference(model, template)
    spec = GenerateSpec(max_new_tokens=max_new_tokens, temperature=temperature)
    system = loaded.system if system is None else system
    messages = [{"role": "system", "content": system}] if system else []
    console.print(f"[dim]{model} ({loaded.template.name} template"
                  + (f"; system prompt: {system}" if system else "") + "). Empty line to quit.[/]", highlight=False)
    while True:
        try:
            question = console.input("[bold green]you>[/] ").strip()
        except (EOFError, KeyboardInterrupt):
            break
        if not question:
            break
        messages.append({"role": "user", "content": question})
        console.print("[bold blue]model>[/] ", end="")
        pieces, stream = [], stream_answer(loaded, messages, spec)
        try:
            for piece in stream:
                pieces.append(piece)
                console.print(piece, end="", highlight=False, markup=False)
        except KeyboardInterrupt:  # Ctrl-C stops this answer, not the conversation
            stream.close()
            console.print(" [dim](stopped)[/]", end="")
        except ShitateError as error:  # a conversation past the model's positions: this turn is refused, not the chat
            console.print(f"\n[red]{error}[/]", highlight=False)
            messages.pop()
            continue
        console.print()
        messages.append({"role": "assistant", "content": "".join(pieces).strip()})


@app.command()
def compare(
    base: str = typer.Argument(..., help=MODEL_HELP),
    tuned: str = typer.Argument(..., help=MODEL_HELP),
    prompts: Path = typer.Argument(..., help="chat JSONL (last answer = reference) or {\"prompt\": …} lines"),
    out: Path = typer.Option(Path("compare.jsonl"), help="where to save the answers"),
    recipe: Path | None = typer.Option(None, help="take the rubric, system prompt and generation settings from here "
                                                     "(default: TUNED's recipe when it is a run folder)"),
    max_new_tokens: int | None = typer.Option(None, help="override the recipe's generate.max_new_tokens"),
) -> None:
    """Ask two models the same questions and show the answers side by side, with rubric totals."""
    from shitate.config import GenerateSpec, load_recipe
    from shitate.evals.compare import compare as run_compare
    from shitate.evals.compare import print_comparison
    from shitate.runs import find_run

    tuned_run = find_run(tuned)
    recipe_path = recipe or (tuned_run.recipe_file if tuned_run else None)
    loaded_recipe = load_recipe(recipe_path, check_files=False) if recipe_path else None
    spec = loaded_recipe.generate if loaded_recipe else GenerateSpec()
    if max_new_tokens:
        spec = spec.model_copy(update={"max_new_tokens": max_new_tokens})
    rubric = loaded_recipe.eval.rubric if loaded_recipe else []
    system = loaded_recipe.data.system if loaded_recipe else None
    template = loaded_recipe.template if loaded_recipe else "auto"
    rows = run_compare(base, tuned, prompts, out, spec, rubric, system, template)
    print_comparison(rows, rubric, base, tuned)
    typer.echo(f"Saved {len(rows)} rows to {out}", err=True)


@app.command()
def score(
    model: str = typer.Argument(..., help="a reward model: a finished run folder of stage reward"),
    file: Path = typer.Argument(..., help='JSONL of {"prompt": …, "answer": …} (or preference pairs, or chats '
                                          "ending with the answer)"),
    out: Path | None = typer.Option(None, help="also write the scores as JSONL here"),
) -> None:
    """Score prompt/answer pairs with a reward model and print them, highest first."""
    from rich.table import Table

    from shitate.data.formats import write_jsonl
    from shitate.data.preference import answer_text
    from shitate.errors import ShitateError
    from shitate.evals.preference import read_answers_to_score, reward_scores
    from shitate.models.inference import load_for_inference
    from shitate.progress import console
    from shitate.runs import find_run

    run = find_run(model)
    if run is None or run.recipe_setting("stage") != "reward":
        made_by = f"a run of stage {run.recipe_setting('stage', 'sft')}, " if run is not None else ""
        raise ShitateError(f"{model}: {made_by}not a reward model. Give the run folder of a finished `stage: reward` "
                           "run.")
    items = read_answers_to_score(file)
    loaded = load_for_inference(model)
    recipe = run.recipe()
    scores = reward_scores(loaded, items, recipe.data.system, recipe.train.max_length)
    rows: list[dict[str, Any]] = [{"prompt": prompt[-1]["content"], "answer": answer_text(answer), "score": value}
            for (prompt, answer), value in zip(items, scores)]
    table = Table("score", "prompt", "answer", show_lines=True)
    for row in sorted(rows, key=lambda r: -1e30 if r["score"] is None else -r["score"]):
        shown = "—" if row["score"] is None else f"{row['score']:.3f}"
        table.add_row(shown, row["prompt"][:60], row["answer"][:120])
    console.print(table)
    if out:
        write_jsonl(out, rows)


@app.command("eval")
def evaluate(
    target: str = typer.Argument(..., help=f"a run folder (base vs tuned), or one model: {MODEL_HELP}"),
    tasks: str = typer.Option("", help="comma-separated: jcommonsenseqa (jcqa), jnli, jsts, jsquad, translation, summarization"),
    limit: int | None = typer.Option(None, help="examples per task (default: all)"),
    test: Path | None = typer.Option(None, help="questions with reference answers (default: the run's data.test)"),
    jglue: Path = typer.Option(Path("../shared/data/jglue"), help="folder with the JGLUE v1.3 JSON files"),
    out: Path | None = typer.Option(None, help="where results.json and report.html go (default: RUN/eval)"),
    judge: list[str] = typer.Option([], help="a judge: a model (as for MODEL) or an OpenAI-compatible URL such as "
                                             "http://127.0.0.1:8080/v1; repeat for an ensemble"),
    judge_mode: str = typer.Option("pairwise", help="pairwise (base vs tuned, both orders), score (0–100) or likert (0/1/2)"),
    judge_prompt: list[Path] = typer.Option([], help="your own judge prompt (copy one from shitate/evals/prompts/); "
                                                     "repeat to make every judge an ensemble over prompts"),
    general: int = typer.Option(0, help="general-ability check: this many everyday prompts, judged pairwise"),
    chat_bench: Path = typer.Option(Path("../shared/data/chat-bench/rakuda-v2-ja.jsonl"),
                                    help="everyday prompts for --general (JSONL with turns or prompt)"),
    pairs: Path | None = typer.Option(None, help="preference pairs (prompt/chosen/rejected JSONL): how often each "
                                                    "model finds the chosen answer likelier (default: a reward, dpo "
                                                    "or orpo run's data.test)"),
) -> None:
    """Evaluate base and tuned (or one model): reference metrics, rubric, JGLUE, judges; writes report.html."""
    from shitate.workflow import evaluate_target

    out_dir = evaluate_target(target, tasks=[t.strip() for t in tasks.split(",") if t.strip()], limit=limit, test=test,
                              jglue=jglue, out=out, judges=judge, judge_mode=judge_mode, judge_prompts=judge_prompt,
                              general=general, chat_bench=chat_bench, pairs=pairs)
    typer.echo(f"Report: {out_dir / 'report.html'}", err=True)


def _refuse_overwrite(path: Path, force: bool) -> None:
    from shitate.errors import ShitateError

    if path.exists() and not force:
        raise ShitateError(f"{path} already exists; pass --force to overwrite it or choose another path.")


@app.command()
def serve(
    models: list[str] = typer.Argument(..., help="models to serve: MODEL or NAME=MODEL (" + MODEL_HELP + ")"),
    host: str = typer.Option("127.0.0.1", help="address to listen on; 0.0.0.0 opens it to the network"),
    port: int = typer.Option(8000),
    api_key: str | None = typer.Option(None, envvar="SHITATE_API_KEY",
                                          help="require Authorization: Bearer KEY (or set SHITATE_API_KEY)"),
    log_prompts: bool = typer.Option(False, help="log request contents (off: company data stays out of logs)"),
    cache_tokens: int = typer.Option(32768, help="each model's KV cache, in tokens: how much conversation all "
                                                 "users together can hold at once"),
    max_batch: int = typer.Option(32, help="most requests decoded together; more wait for a free slot"),
) -> None:
    """An OpenAI-compatible server: /v1/chat/completions, /v1/completions, /v1/models, /health."""
    import uvicorn

    from shitate.progress import console
    from shitate.serve.engine import open_engines
    from shitate.serve.server import create_app

    if log_prompts:
        import logging

        logging.basicConfig(level=logging.INFO)
    engines = open_engines(models, cache_tokens=cache_tokens, max_requests=max_batch)
    if host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        console.print(f"[yellow]note:[/] listening on {host} without an API key: anyone who can reach this port can "
                      "use the models. Pass --api-key or set SHITATE_API_KEY.")
    console.print(f"Serving {', '.join(engines)} at http://{host}:{port}/v1 "
                  f"({'API key required' if api_key else 'no API key'}).", highlight=False)
    try:
        uvicorn.run(create_app(engines, api_key, log_prompts), host=host, port=port, log_level="warning")
    finally:
        for engine in engines.values():
            engine.close()


@app.command()
def ui(
    base: str = typer.Option("gemma-3-270m", help="the model the chat tab compares against: " + MODEL_HELP),
    tuned: str | None = typer.Option(None, help="a run folder to chat with (training in the UI replaces it)"),
    recipe: list[Path] = typer.Option([], help="recipes offered in the train tab (default: examples/*/recipe*.yaml)"),
    host: str = typer.Option("127.0.0.1", help="address to listen on"),
    port: int = typer.Option(7860),
) -> None:
    """A web UI for the whole loop: check data, train with a live loss curve, evaluate, chat base vs tuned."""
    from shitate.serve.ui import build, launch

    recipes = recipe or sorted(Path("examples").glob("*/recipe*.yaml"))
    typer.echo(f"shitate ui at http://{host}:{port} (Ctrl-C to stop)")
    launch(build(base, tuned, recipes), host, port)


@app.command()
def export(
    run: Path = typer.Argument(..., help="a run folder made by shitate train"),
    out: Path | None = typer.Option(None, help="where to write the merged model (default RUN/export)"),
    dtype: str = typer.Option("bf16", help="bf16, f16 or fp32: the merged weights' type"),
    gguf: list[str] = typer.Option([], "--gguf", help="also write a GGUF for llama.cpp/Ollama: f16, bf16 or q8_0 "
                                                      "(repeatable)"),
    force: bool = typer.Option(False, help="replace an existing export"),
    check: bool = typer.Option(True, help="compare every exported file with the run on Japanese probes (on by default)"),
) -> None:
    """Merge the run's adapter into its base and save a plain model (safetensors, tokenizer, chat template)."""
    from shitate.errors import ConfigError
    from shitate.export.merge import export as run_export
    from shitate.progress import console

    if dtype not in ("bf16", "f16", "fp32"):
        raise ConfigError(f"--dtype {dtype}: choose bf16, f16 or fp32.")
    target = out or run / "export"
    results = run_export(run, target, dtype, tuple(gguf), force, check)
    console.print(f"[bold]Exported[/] {target}: load it with transformers or vLLM as a model folder"
                  + ("; GGUF and an Ollama Modelfile beside it (ollama create NAME -f Modelfile)." if gguf else "."),
                  highlight=False)
    if results:
        console.print("Greedy answers of the run on the probes: "
                      + " / ".join(a.strip()[:40] or "(empty)" for a in results[0].answers[:3]), highlight=False, markup=False)


@app.command()
def audit(run: Path = typer.Argument(..., help="a run folder")) -> None:
    """Which data, model and code made a run; each file's SHA-256 checked against what is on disk now (exit 1 if
    any changed or is missing)."""
    from shitate.errors import ShitateError
    from shitate.progress import console
    from shitate.runs import RunFolder
    from shitate.runs import audit as audit_run

    folder = RunFolder(run)
    manifest = folder.manifest()
    if not manifest:
        raise ShitateError(f"{run}: no manifest.json — not a run folder made by shitate train.")
    versions = ", ".join(f"{k} {v}" for k, v in (manifest.get("versions") or {}).items())
    console.print(f"[bold]{manifest.get('name')}[/] ({manifest.get('stage')}), started {manifest.get('started')} on "
                  f"{manifest.get('host')}, finished {manifest.get('finished', 'not yet')}", highlight=False)
    console.print(f"  code   shitate commit {manifest.get('git_commit') or 'unknown (not a git checkout)'}; {versions}",
                  highlight=False)
    source = manifest.get("model_source") or {}
    console.print(f"  model  {source.get('kind')} {source.get('folder')}", highlight=False)
    rows = audit_run(folder)
    marks = {"ok": "[green]ok[/]", "changed": "[bold red]CHANGED[/]", "missing": "[bold red]MISSING[/]"}
    for row in rows:
        console.print(f"  {marks[row['status']]:<22} {row['role']:<16} {row['path']}  {row['sha256'][:16]}…",
                      highlight=False)
    bad = [r for r in rows if r["status"] != "ok"]
    if bad:
        raise ShitateError(f"{len(bad)} of {len(rows)} files that made {run} changed or are missing since it ran: "
                           "the run cannot be reproduced from what is on disk.")
    console.print(f"All {len(rows)} files match the hashes recorded when the run was made.")


def main() -> None:
    """Console entry point: user mistakes become one paragraph and exit code 1, bugs keep their traceback."""
    from shitate.errors import ShitateError, TrainingInterrupted
    from shitate.memory import bound_kernel_caches

    bound_kernel_caches()
    try:
        app()
    except ShitateError as err:
        from shitate.progress import console

        console.print("[bold red]error:[/] ", end="")
        console.print(str(err), highlight=False, markup=False)
        sys.exit(1)
    except TrainingInterrupted as stopped:
        from shitate.progress import console

        console.print(str(stopped), highlight=False, markup=False)
        sys.exit(130)  # what a shell reports for a program ended by SIGINT


if __name__ == "__main__":
    main()
