"""Several training files mixed by weight: how a team keeps a tuned model's everyday manners.

A weight says how many times each record of a file is used an epoch: 1 every record once,
2 every record twice, 0.05 a seeded twentieth of the file. The draw depends on the seed and
the source's place in the list only, so a resumed run trains on the same mix.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from shitate.errors import ConfigError

Record = TypeVar("Record")


@dataclass(frozen=True)
class SourceShare:
    """How much of one source went into the mix."""

    path: Path
    weight: float
    available: int
    used: int

    def as_dict(self, total: int) -> dict[str, Any]:
        return {"path": str(self.path), "weight": self.weight, "records": self.available, "used": self.used,
                "share": round(self.used / max(total, 1), 4)}


def mix(sources: list[Any], read: Callable[[Path], list[Record]], seed: int) -> tuple[list[Record], list[SourceShare]]:
    """Read each source (anything with .path and .weight) and draw its weighted share; return records and shares."""
    mixed: list[Record] = []
    shares = []
    for index, source in enumerate(sources):
        records = read(source.path)
        whole, fraction = divmod(source.weight, 1.0)
        drawn = records * int(whole)
        extra = round(fraction * len(records))
        if extra:
            picker = random.Random(f"{seed}:{index}")
            drawn += [records[i] for i in sorted(picker.sample(range(len(records)), extra))]
        if not drawn:
            raise ConfigError(f"data.train: {source.path}: weight {source.weight} takes none of its {len(records)} "
                              f"records; use a weight of at least {1 / max(len(records), 1):.2g}.")
        mixed += drawn
        shares.append(SourceShare(Path(source.path), source.weight, len(records), len(drawn)))
    return mixed, shares
