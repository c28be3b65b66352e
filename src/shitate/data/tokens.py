"""What tuning on a data set costs: tokens, hosted fine-tuning at list prices, and when tuning pays off
against few-shot prompting of an untuned model (`data estimate`).

Training time on this machine is not computed here: it is measured by a dry run of the recipe (workflow.estimate),
because a constant tokens-per-second would be wrong by 2× between two CPUs of the same nominal speed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml

from shitate.errors import ConfigError

PRICES = Path(__file__).parent / "prices.yaml"


@dataclass(frozen=True)
class Price:
    """US dollars per million tokens."""

    training: float
    input: float
    output: float
    tuned_input: float
    tuned_output: float


@dataclass(frozen=True)
class Usage:
    """The data's shape in tokens of the model's own tokenizer."""

    examples: int
    tokens_per_epoch: int     # every token of every example, as training sees them (template included)
    epochs: int
    prompt_tokens: float      # mean tokens of what a request sends (system, context, question)
    answer_tokens: float      # mean tokens of an answer
    shots: int                # examples a few-shot prompt would carry instead of tuning

    @property
    def training_tokens(self) -> int:
        return self.tokens_per_epoch * self.epochs

    @property
    def few_shot_tokens(self) -> float:
        """Extra prompt tokens per request when the examples travel in the prompt instead of in the weights."""
        return self.shots * (self.prompt_tokens + self.answer_tokens)


@dataclass(frozen=True)
class Estimate:
    service: str
    training_cost: float
    tuned_per_request: float
    few_shot_per_request: float

    @property
    def break_even_requests(self) -> float | None:
        """Requests after which tuning once costs less than few-shot prompting every time; None if never."""
        saving = self.few_shot_per_request - self.tuned_per_request
        return self.training_cost / saving if saving > 0 else None


def load_prices(path: Path | None = None) -> tuple[dict[str, Price], str]:
    """The price table (services, as-of date); ConfigError naming the file and entry when malformed."""
    path = Path(path or PRICES)
    try:
        table = yaml.safe_load(path.read_text(encoding="utf-8"))
        services = {name: Price(**values) for name, values in table["services"].items()}
    except FileNotFoundError:
        raise ConfigError(f"{path}: price table not found") from None
    except (yaml.YAMLError, KeyError, TypeError, AttributeError) as err:
        raise ConfigError(f"{path}: not a price table ({err}); each service needs training, input, output, "
                          f"tuned_input and tuned_output per million tokens — see {PRICES}") from None
    return services, str(table.get("as_of", "unknown date"))


def estimate(usage: Usage, services: dict[str, Price]) -> list[Estimate]:
    """Training cost and per-request costs of each hosted service for this data."""
    estimates = []
    for name, price in services.items():
        tuned = (usage.prompt_tokens * price.tuned_input + usage.answer_tokens * price.tuned_output) / 1e6
        few_shot = ((usage.prompt_tokens + usage.few_shot_tokens) * price.input + usage.answer_tokens * price.output) / 1e6
        estimates.append(Estimate(name, usage.training_tokens * price.training / 1e6, tuned, few_shot))
    return estimates
