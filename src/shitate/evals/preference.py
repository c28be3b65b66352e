"""Preference accuracy: how often a model finds the chosen answer of a held-out pair likelier than the rejected one.

Any model can be measured (mean log-probability per token of each answer, so a longer answer
is not penalised for its length); for a tuned model measured beside the model it started from,
DPO's implicit reward — how much more the tuned model raised the chosen answer than the
rejected one, relative to the start — is reported too. Pairs are scored as training sees them:
the prompt once, both answers beside it (data/collate.tree_batch).
"""

from __future__ import annotations

from typing import Any

import torch

from shitate.data.collate import split_by_tokens, tree_batch
from shitate.data.preference import encode_pair
from shitate.progress import status

CAPACITY = 4096  # tokens a forward pass scores at once


@torch.no_grad()
def answer_logps(loaded: Any, pairs: list[dict[str, Any]], system: str | None,
                 max_length: int = 1024) -> list[dict[str, float]]:
    """Per pair: summed log-probability and token count of the chosen and the rejected answer."""
    from shitate.models.attention import use_packed_attention
    from shitate.models.logprobs import AnswerLogProbs, logprob_inputs

    examples = [encode_pair(pair, loaded.tokenizer, loaded.template, max_length, system) for pair in pairs]
    kept = [e for e in examples if e is not None]
    use_packed_attention(loaded.model)  # tree rows need attention that knows them; padded batches work as before
    scorer = AnswerLogProbs(loaded.model, compute_dtype=next(loaded.model.parameters()).dtype)
    pad = loaded.tokenizer.pad_token_id if loaded.tokenizer.pad_token_id is not None else 0
    device = next(loaded.model.parameters()).device
    values: list[dict[str, float]] = []
    with status(f"scoring {len(kept)} preference pairs…"):
        for group in split_by_tokens(kept, CAPACITY, packed=True):
            batch = tree_batch(group, CAPACITY, pad, device)
            logps, counts = scorer(**logprob_inputs(batch))
            for (chosen, rejected), (n_chosen, n_rejected) in zip(logps.view(-1, 2).tolist(), counts.view(-1, 2).tolist()):
                values.append({"chosen": chosen, "rejected": rejected, "chosen_tokens": n_chosen,
                               "rejected_tokens": n_rejected})
    return values


def preference_metrics(scores: list[dict[str, float]], start: list[dict[str, float]] | None = None) -> dict[str, float]:
    """Accuracy and mean margin of per-token log-probability; with the starting model's scores, implicit reward too."""
    margins = [s["chosen"] / max(s["chosen_tokens"], 1) - s["rejected"] / max(s["rejected_tokens"], 1) for s in scores]
    found = {"preference accuracy": _accuracy(margins), "log-prob margin per token": sum(margins) / len(margins)}
    if start is not None:
        implicit = [(s["chosen"] - b["chosen"]) - (s["rejected"] - b["rejected"]) for s, b in zip(scores, start)]
        found["implicit reward accuracy"] = _accuracy(implicit)
        found["implicit reward margin"] = sum(implicit) / len(implicit)
    return found


def _accuracy(margins: list[float]) -> float:
    """Share of positive margins, a tie counting half."""
    return sum(1.0 if m > 0 else 0.5 if m == 0 else 0.0 for m in margins) / len(margins)


def read_answers_to_score(path: Any) -> list[tuple[list[dict[str, str]], list[dict[str, str]]]]:
    """(prompt messages, answer messages) from {"prompt", "answer"} lines (also completion/response), pairs
    (both answers), or chats ending with an assistant turn; every problem of the file is raised at once."""
    from pathlib import Path

    from shitate.data.formats import read_jsonl
    from shitate.data.preference import answer_messages, prompt_messages
    from shitate.errors import DataError, Problem

    items, problems = [], []
    for line, obj in read_jsonl(Path(path)):
        try:
            if isinstance(obj, Problem):
                raise ValueError(obj.message)
            if not isinstance(obj, dict):
                raise ValueError("expected a JSON object")
            if isinstance(obj.get("messages"), list) and obj["messages"]:
                messages = obj["messages"]
                items.append((prompt_messages(messages[:-1]), answer_messages(messages[-1:], "messages[-1]")))
                continue
            prompt = prompt_messages(obj.get("prompt"))
            sides = [k for k in ("chosen", "rejected", "answer", "completion", "response") if k in obj]
            if not sides:
                raise ValueError("no answer: give \"answer\" (or chosen/rejected, completion, response)")
            items.extend((prompt, answer_messages(obj[side], side)) for side in sides)
        except ValueError as err:
            problems.append(Problem(path, line, None, str(err), 'write {"prompt": …, "answer": …} on each line'))
    if problems:
        raise DataError(problems)
    if not items:
        raise DataError([Problem(path, None, None, "nothing to score")])
    return items


@torch.no_grad()
def reward_scores(loaded: Any, items: list[tuple[list[dict[str, str]], list[dict[str, str]]]],
                  system: str | None = None, max_length: int = 1024) -> list[float | None]:
    """The reward model's score of each (prompt, answer), with the system prompt the reward model was trained
    with; None where no answer token fits in max_length."""
    from shitate.data.preference import encode_answers
    from shitate.models.attention import use_packed_attention
    from shitate.models.reward import RewardModel

    reward_model = RewardModel(loaded.model)
    reward_model.load_head(loaded.source.adapter or loaded.source.folder)
    reward_model.eval()
    use_packed_attention(loaded.model)
    def with_system(prompt: list[dict[str, str]]) -> list[dict[str, str]]:
        return prompt if not system or prompt[0]["role"] == "system" else [{"role": "system", "content": system}] + prompt

    examples = [encode_answers(with_system(prompt), [answer], loaded.tokenizer, loaded.template, max_length)
                for prompt, answer in items]
    kept = [i for i, e in enumerate(examples) if e is not None]
    pad = loaded.tokenizer.pad_token_id if loaded.tokenizer.pad_token_id is not None else 0
    device = next(loaded.model.parameters()).device
    scores: list[float | None] = [None] * len(items)
    order = iter(kept)
    with status(f"scoring {len(kept)} answers…"):
        for group in split_by_tokens([e for e in examples if e is not None], CAPACITY, packed=True):
            batch = tree_batch(group, CAPACITY, pad, device)
            for value in reward_model(**batch).tolist():
                scores[next(order)] = value
    return scores
