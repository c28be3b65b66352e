"""Preference pairs: the canonical record, importers for the shapes people have, and `data check` for pairs.

Canonical record: {"prompt": str | messages, "chosen": str | messages, "rejected": str | messages}.
A string prompt is one user turn; a string answer is one assistant turn; messages let a prompt be
a whole conversation (with its system prompt) and an answer be the assistant turn(s) after it.

Importers turn into pairs: prompt/chosen/rejected files (also with `question`/`answer_*` names),
ranked answers ({"prompt", "answers": [best, …, worst]} → every better/worse pair), and
MT-Bench-style pairwise judgments (ja-vicuna-qa's `model_judgment/pairwise/…`: a pair only
where the judge picked the same winner with the answers in both orders, and not a tie).
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import TYPE_CHECKING, Any

from shitate.data.formats import ROLES, read_jsonl, read_records
from shitate.data.validate import FileReport
from shitate.errors import DataError, Problem

if TYPE_CHECKING:  # collate brings torch, which reading and checking a data file does not need
    from shitate.data.collate import Example

Messages = list[dict[str, str]]
SIDES = ("prompt", "chosen", "rejected")
PREFERENCE_FORMATS = ("preference", "ranked", "judgment")


def is_preference_record(record: Any) -> bool:
    return isinstance(record, dict) and "chosen" in record and "rejected" in record


def looks_like_preferences(path: Path) -> bool:
    """Whether a file's (or a folder's first file's) first record has a preference shape."""
    path = Path(path)
    if path.is_dir():
        path = next(iter(sorted(path.glob("*.jsonl"))), path)
    if not path.is_file() or path.suffix.lower() in (".csv", ".tsv", ".xlsx", ".xlsm", ".xls", ".txt", ".md"):
        return False
    first = next((obj for _, obj in read_records(path)), None)
    return detect_preference_format(first) is not None


def detect_preference_format(record: Any) -> str | None:
    """Which preference shape a JSON record has, if any."""
    if not isinstance(record, dict):
        return None
    if record.keys() & {"chosen", "rejected"} or {"answer_chosen", "answer_rejected"} <= record.keys():
        return "preference"  # a pair with one side missing is still a pair, and `data check` names the side
    if ("prompt" in record or "question" in record) and isinstance(record.get("answers") or record.get("ranking"), list):
        return "ranked"
    if {"answer_1", "answer_2", "g1_winner", "g2_winner"} <= record.keys():
        return "judgment"
    return None


def prompt_messages(value: Any, where: str = "prompt") -> Messages:
    """A prompt as messages ending with a user turn (a plain string is one); ValueError says what is wrong."""
    return _turns(value, where, "user", "a prompt ends with the user's turn")


def answer_messages(value: Any, where: str) -> Messages:
    """An answer as assistant turn(s) (a plain string is one); ValueError says what is wrong."""
    return _turns(value, where, "assistant", "an answer ends with an assistant turn")


def _turns(value: Any, where: str, last_role: str, rule: str) -> Messages:
    if isinstance(value, str):
        if not value.strip():
            raise ValueError(f"{where}: is empty")
        return [{"role": last_role, "content": value.strip()}]
    messages = _messages(value, where)
    if messages[-1]["role"] != last_role:
        raise ValueError(f"{where}: the last turn is {messages[-1]['role']!r}; {rule}")
    return messages


def _messages(value: Any, where: str) -> Messages:
    if value is None:
        raise ValueError(f"{where}: missing")
    if not isinstance(value, list) or not value:
        raise ValueError(f"{where}: is {type(value).__name__}; expected a string or a non-empty list of messages")
    out = []
    for i, message in enumerate(value):
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise ValueError(f"{where}[{i}]: expected {{\"role\": system|user|assistant, \"content\": …}}")
        content = message.get("content")
        if not isinstance(content, str) or not content.strip():
            raise ValueError(f"{where}[{i}].content: is empty or not a string")
        out.append({"role": message["role"], "content": content.strip()})
    return out


def answer_text(messages: Messages) -> str:
    return "\n".join(m["content"] for m in messages)


def canonical_pair(record: dict[str, Any]) -> dict[str, Any]:
    """A pair in canonical form (strings stay strings); ValueError on a pair that cannot train anything."""
    prompt = record.get("prompt", record.get("question"))
    chosen = record.get("chosen", record.get("answer_chosen"))
    rejected = record.get("rejected", record.get("answer_rejected"))
    prompt_messages(prompt)
    chosen_text = answer_text(answer_messages(chosen, "chosen"))
    rejected_text = answer_text(answer_messages(rejected, "rejected"))
    if chosen_text == rejected_text:
        raise ValueError("chosen: is identical to rejected; the pair teaches nothing — drop it")
    strip = lambda v: v.strip() if isinstance(v, str) else v  # noqa: E731
    return {"prompt": strip(prompt), "chosen": strip(chosen), "rejected": strip(rejected)}


def _ranked_pairs(record: dict[str, Any]) -> list[dict[str, Any]]:
    """Answers listed best first (or with a `ranks` list, 1 = best) → every (better, worse) pair; ties give none."""
    prompt = record.get("prompt", record.get("question"))
    answers: list[Any] = record.get("answers") or record.get("ranking") or []
    ranks = record.get("ranks") or list(range(1, len(answers) + 1))
    if not isinstance(ranks, list):
        raise ValueError(f"ranks: is {type(ranks).__name__}; give a list of numbers, 1 = best")
    if len(ranks) != len(answers):
        raise ValueError(f"ranks: {len(ranks)} ranks for {len(answers)} answers")
    if len(answers) < 2:
        raise ValueError("answers: a ranking needs at least two answers")
    ordered = sorted(zip(ranks, answers), key=lambda pair: pair[0])
    return [canonical_pair({"prompt": prompt, "chosen": better, "rejected": worse})
            for (rank_a, better), (rank_b, worse) in itertools.combinations(ordered, 2) if rank_a < rank_b]


def _judged_pair(record: dict[str, Any]) -> list[dict[str, Any]]:
    """A pairwise judgment → a pair when both answer orders agree on a winner (and it is not a tie), else none."""
    first, second = record.get("g1_winner"), record.get("g2_winner")
    if first != second or first not in ("model_1", "model_2"):
        return []
    winner, loser = ("answer_1", "answer_2") if first == "model_1" else ("answer_2", "answer_1")
    return [canonical_pair({"prompt": record.get("question") or record.get("prompt"),
                            "chosen": record[winner], "rejected": record[loser]})]


def import_preferences(path: Path, fmt: str = "auto") -> tuple[list[dict[str, Any]], list[Problem], int]:
    """Pairs from a file (or a folder of judgment files); returns (pairs, problems, records read without a pair)."""
    path = Path(path)
    files = sorted(path.glob("*.jsonl")) if path.is_dir() else [path]
    if not files:
        raise DataError([Problem(path, None, None, "has no .jsonl files", "give a preference JSONL file or a folder of them")])
    pairs, problems, without_pair = [], [], 0
    for file in files:
        for line, obj in read_records(file):  # importers accept what people have: arrays, Parquet
            if isinstance(obj, Problem):
                problems.append(obj)
                continue
            kind = detect_preference_format(obj) if fmt == "auto" else fmt
            if kind is None:
                keys = ", ".join(obj) if isinstance(obj, dict) else type(obj).__name__
                problems.append(Problem(file, line, None, f"not a preference record (keys: {keys})",
                                        "expected prompt/chosen/rejected, prompt + answers (ranked best first), or a "
                                        "pairwise judgment (answer_1, answer_2, g1_winner, g2_winner)"))
                continue
            try:
                made = {"preference": lambda r: [canonical_pair(r)], "ranked": _ranked_pairs,
                        "judgment": _judged_pair}[kind](obj)
            except (ValueError, KeyError, TypeError) as err:
                field, _, message = str(err).strip("'").partition(": ")
                problems.append(Problem(file, line, field if message else None, message or str(err)))
                continue
            without_pair += not made
            pairs.extend(made)
    return pairs, problems, without_pair


def read_preferences(path: Path) -> list[tuple[int, dict[str, Any]]]:
    """(line, pair) of a canonical preference JSONL, read strictly: any problem raises DataError listing all."""
    path = Path(path)
    records, problems = [], []
    for line, obj in read_jsonl(path):
        if isinstance(obj, Problem):
            problems.append(obj)
        elif isinstance(obj, dict) and (obj.keys() & {"chosen", "rejected"}) and not is_preference_record(obj):
            side = "rejected" if "chosen" in obj else "chosen"
            problems.append(Problem(path, line, side, "missing", 'a pair is {"prompt": …, "chosen": …, "rejected": …}'))
        elif not is_preference_record(obj):
            kind = detect_preference_format(obj)
            if kind:
                fix = f"this looks like {kind} data: convert it with `shitate data import --format {kind}`"
            elif isinstance(obj, dict) and ("messages" in obj or "text" in obj):
                fix = ("this is a chat record (for stage sft)" if "messages" in obj else "this is raw text (for stage "
                       "pretrain)") + '; the preference stages train on {"prompt": …, "chosen": …, "rejected": …}'
            else:
                fix = 'write {"prompt": …, "chosen": …, "rejected": …} on each line'

            problems.append(Problem(path, line, None, "not a preference pair", fix))
        else:
            try:
                records.append((line, canonical_pair(obj)))
            except ValueError as err:
                field, _, message = str(err).partition(": ")
                problems.append(Problem(path, line, field, message, "run `shitate data check` on the file"))
    if problems:
        raise DataError(problems)
    if not records:
        raise DataError([Problem(path, None, None, "the file has no preference pairs")])
    return records


def check_preference_file(path: Path, tokenizer: Any = None, template: Any = None, max_length: int | None = None,
                          system: str | None = None) -> FileReport:
    """Every problem of a preference JSONL with its line, and statistics; with a tokenizer, over-long pairs."""
    from shitate.data.templates import SpecialMarkers

    path = Path(path)
    report = FileReport(path)
    markers = SpecialMarkers(tokenizer)
    seen: set[str] = set()
    for line, obj in read_jsonl(path):
        if isinstance(obj, Problem):
            report.errors.append(obj)
            continue
        if not is_preference_record(obj):
            for side in SIDES:
                if not isinstance(obj, dict) or side not in obj:
                    report.errors.append(Problem(path, line, side, "missing",
                                                 'a pair is {"prompt": …, "chosen": …, "rejected": …}'))
            continue
        try:
            pair = canonical_pair(obj)
        except ValueError as err:
            field, _, message = str(err).partition(": ")
            report.errors.append(Problem(path, line, field.split("[")[0], message))
            continue
        bad = [(side, marker) for side in SIDES for marker in markers.found_in(_side_text(pair[side]))]
        for side, marker in bad:
            report.errors.append(Problem(path, line, side, f"contains the special token string {marker!r}",
                                         "remove it: templates add turn markers themselves"))
        if bad:
            continue
        report.records += 1
        key = "\x1e".join(_side_text(pair[side]) for side in SIDES)
        if key in seen:
            report.duplicates += 1
            report.warnings.append(Problem(path, line, None, "repeats an earlier pair", "remove the copy"))
        seen.add(key)
        report.turns.update(["pair"])
        if tokenizer is not None and template is not None:
            lengths = pair_lengths(pair, tokenizer, template, system)
            report.lengths.append(sum(lengths))
            for side, count in zip(SIDES, lengths):
                report.tokens[side] += count
            longest = lengths[0] + max(lengths[1:])
            if max_length is not None and longest > max_length:
                report.warnings.append(Problem(path, line, None, f"prompt and answer are {longest} tokens, longer "
                                               f"than max_length {max_length}", "the answers will be cut on the right "
                                               "(and a long prompt on the left); raise train.max_length or shorten it"))
    if report.records == 0 and not report.errors:
        report.errors.append(Problem(path, None, None, "the file has no preference pairs"))
    return report


def _side_text(value: Any) -> str:
    return value if isinstance(value, str) else "\x1f".join(m["content"] for m in value)


def pair_lengths(pair: dict[str, Any], tokenizer: Any, template: Any, system: str | None) -> tuple[int, int, int]:
    """Tokens of the rendered prompt (with the generation cue), of the chosen and of the rejected answer."""
    from shitate.data.templates import encode_chat

    prompt = conversation_prompt(pair, system)
    full = [len(encode_chat(prompt + answer_messages(pair[side], side), tokenizer, template, 10**9)["input_ids"])
            for side in ("chosen", "rejected")]
    shown = len(tokenizer(template(prompt, add_generation_prompt=True), add_special_tokens=False)["input_ids"])
    return shown, full[0] - shown, full[1] - shown


def conversation_prompt(pair: dict[str, Any], system: str | None) -> Messages:
    """The prompt's messages with the recipe's system prompt first (unless the prompt brings its own)."""
    messages = prompt_messages(pair["prompt"])
    if system and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": system})
    return messages


def prompt_key(record: dict[str, Any]) -> str:
    """What makes two pairs share a prompt, for `data split` (every pair of one prompt in one split)."""
    return " ".join(_side_text(record["prompt"]).split())


def encode_pair(pair: dict[str, Any], tokenizer: Any, template: Any, max_length: int,
                system: str | None) -> Example | None:
    """{input_ids: prompt + chosen + rejected, labels, branches: [prompt, chosen, rejected] lengths}; None when
    an answer has no token left within max_length."""
    answers = [answer_messages(pair[side], side) for side in ("chosen", "rejected")]
    return encode_answers(conversation_prompt(pair, system), answers, tokenizer, template, max_length)


def encode_answers(prompt: Messages, answers: list[Messages], tokenizer: Any, template: Any,
                   max_length: int) -> Example | None:
    """One prompt and its answers as a tree-shaped example: the prompt once, then each answer (collate.tree_batch).

    Each answer is rendered with the prompt whole through the template, as training and inference
    render a chat, and the prompt is the tokens all renderings share before their answers begin. Past
    max_length a long prompt keeps its first token (<bos>) and its end, and answers are cut on the right.
    """
    from shitate.data.templates import IGNORE_INDEX, encode_chat

    sides = [encode_chat(prompt + answer, tokenizer, template, 10**9) for answer in answers]
    firsts = [next((i for i, label in enumerate(s["labels"]) if label != IGNORE_INDEX), len(s["labels"])) for s in sides]
    first_ids = sides[0]["input_ids"]
    common = min(next((i for i, (a, b) in enumerate(zip(first_ids, s["input_ids"])) if a != b),
                      min(len(first_ids), len(s["input_ids"]))) for s in sides)
    shared = max(1, min(common, *firsts))
    prompt_ids = first_ids[:shared]
    branches = [(s["input_ids"][shared:], s["labels"][shared:]) for s in sides]
    longest = max(len(ids) for ids, _ in branches)
    if len(prompt_ids) + longest > max_length and len(prompt_ids) > max_length // 2:
        keep = max(1, max_length // 2 - 1)
        prompt_ids = prompt_ids[:1] + prompt_ids[-keep:]
    room = max_length - len(prompt_ids)
    branches = [(ids[:room], labels[:room]) for ids, labels in branches]
    if any(all(label == IGNORE_INDEX for label in labels) for _, labels in branches):
        return None
    return {"input_ids": prompt_ids + [t for ids, _ in branches for t in ids],
            "labels": [IGNORE_INDEX] * len(prompt_ids) + [t for _, labels in branches for t in labels],
            "branches": [len(prompt_ids)] + [len(ids) for ids, _ in branches]}
