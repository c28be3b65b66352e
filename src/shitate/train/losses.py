"""The training losses: the answer-only loss (on the chunked kernel of models/logprobs.py) and the
preference losses, each a formula a test checks against values computed by hand."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from shitate.data.templates import IGNORE_INDEX
from shitate.models.logprobs import decoder_states, linear_cross_entropy_and_hits, output_softcap


class AnswerLoss(nn.Module):
    """Wraps a causal LM so that forward returns (summed answer loss, number of answer tokens, {"token_accuracy":
    how many of them the model ranks first}) — validation reports the accuracy's mean per token.

    Being a module (not a function) lets DDP/FSDP wrap it and sync gradients as usual.
    """

    causal_lm: Any  # a transformers model (or PEFT's wrapper of one): typed loosely upstream

    def __init__(self, causal_lm: nn.Module, compute_dtype: torch.dtype = torch.float32, chunk_size: int | None = None) -> None:
        super().__init__()
        self.causal_lm = causal_lm
        self.compute_dtype = compute_dtype
        self.chunk_size = chunk_size  # None: as suits the device (models/logprobs.loss_chunk_rows)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None,
                packed_lengths: list[list[int]] | None = None) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        base, states = decoder_states(self.causal_lm, input_ids, attention_mask, position_ids, packed_lengths)
        targets = labels[:, 1:]
        keep = targets != IGNORE_INDEX
        hidden = states[:, :-1][keep]
        softcap = output_softcap(base)
        total, hits = linear_cross_entropy_and_hits(hidden, base.get_output_embeddings().weight, targets[keep],
                                                    self.chunk_size, self.compute_dtype, softcap)
        return total, keep.sum(), {"token_accuracy": hits}


# --- preference losses: per pair, on summed (or mean) answer log-probabilities -------------------------------------

def dpo_losses(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, reference_chosen: torch.Tensor,
               reference_rejected: torch.Tensor, beta: float, kind: str = "sigmoid") -> torch.Tensor:
    """DPO (Rafailov et al. 2023): −log σ(β·h); IPO (Azar et al. 2023): (h − 1/(2β))²; h is the log-ratio margin.

    h = (log π(chosen) − log π(rejected)) − (log π_ref(chosen) − log π_ref(rejected)).
    """
    margin = (policy_chosen - policy_rejected) - (reference_chosen - reference_rejected)
    if kind == "ipo":
        return (margin - 1.0 / (2.0 * beta)) ** 2
    return -F.logsigmoid(beta * margin)


def orpo_losses(chosen_mean_logp: torch.Tensor, rejected_mean_logp: torch.Tensor, weight: float) -> torch.Tensor:
    """ORPO (Hong et al. 2024): NLL of the chosen answer − λ·log σ(log odds ratio), on mean per-token log-probs.

    odds(y) = p / (1 − p) with p = exp(mean log-prob); log(1 − p) is taken as log(−expm1(log p)),
    which stays finite and accurate as p approaches 1 where log1p(−exp(·)) loses digits.
    """
    chosen, rejected = chosen_mean_logp.clamp(max=-1e-7), rejected_mean_logp.clamp(max=-1e-7)
    log_odds = (chosen - rejected) - (torch.log(-torch.expm1(chosen)) - torch.log(-torch.expm1(rejected)))
    return -chosen_mean_logp - weight * F.logsigmoid(log_odds)


def bradley_terry_losses(chosen_reward: torch.Tensor, rejected_reward: torch.Tensor, margin: float = 0.0) -> torch.Tensor:
    """Reward-model loss: −log σ(r(chosen) − r(rejected) − margin) (Bradley–Terry; margin as in Llama 2)."""
    return -F.logsigmoid(chosen_reward - rejected_reward - margin)
