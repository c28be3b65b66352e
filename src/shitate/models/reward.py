"""A reward model: a causal LM's decoder with a scalar head read at an answer's last token.

Trained by stage reward (train/preference.py), used by `shitate score` and as a reward in ppo/grpo.
The head is saved beside the adapter (or model) as reward_head.safetensors.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from shitate.errors import ConfigError
from shitate.models.logprobs import decoder_states

REWARD_HEAD_FILE = "reward_head.safetensors"


class RewardModel(nn.Module):
    """A causal LM's decoder with a scalar head read at an answer's last token: how good the answer is."""

    causal_lm: Any  # a transformers model (or PEFT's wrapper of one): typed loosely upstream

    def __init__(self, causal_lm: Any) -> None:
        super().__init__()
        self.causal_lm = causal_lm
        width = causal_lm.config.get_text_config().hidden_size
        self.head = nn.Linear(width, 1, device=next(causal_lm.parameters()).device)
        nn.init.normal_(self.head.weight, std=1.0 / (width + 1) ** 0.5)  # as OpenAI's lm-human-preferences starts it
        nn.init.zeros_(self.head.bias)

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, packed_lengths: list[list[Any]],
                last: torch.Tensor, **_: Any) -> torch.Tensor:
        _, states = decoder_states(self.causal_lm, input_ids, None, position_ids, packed_lengths)
        hidden = states.reshape(-1, states.shape[-1])[last]
        return self.head(hidden.to(self.head.weight.dtype)).squeeze(-1).float()

    def set_attn_implementation(self, name: str) -> None:
        self.causal_lm.set_attn_implementation(name)

    def save_pretrained(self, folder: Path, safe_serialization: bool = True) -> None:
        """The adapter (or model) as PEFT or transformers saves it, and the head beside it."""
        from safetensors.torch import save_file

        self.causal_lm.save_pretrained(folder, safe_serialization=safe_serialization)
        save_file({name: p.detach().float().cpu().contiguous() for name, p in self.head.state_dict().items()},
                  str(Path(folder) / REWARD_HEAD_FILE))

    def load_head(self, folder: Path) -> None:
        from safetensors.torch import load_file

        file = Path(folder) / REWARD_HEAD_FILE
        if not file.is_file():
            raise ConfigError(f"{folder}: no {REWARD_HEAD_FILE}; this run is not a reward model (train one with "
                              "`stage: reward`).")
        self.head.load_state_dict({k: v.to(self.head.weight.device) for k, v in load_file(str(file)).items()})
