from pathlib import Path
from types import SimpleNamespace

import pytest

from shitate.data.mix import mix
from shitate.errors import ConfigError


def read(path: Path) -> list[str]:
    return [f"{path.name}-{i}" for i in range(int(path.stem))]


def test_weights_take_whole_copies_and_a_seeded_share():
    sources = [SimpleNamespace(path=Path("10.jsonl"), weight=2.0), SimpleNamespace(path=Path("100.jsonl"), weight=0.25)]
    records, shares = mix(sources, read, seed=42)
    assert [s.used for s in shares] == [20, 25] and len(records) == 45
    assert records[:20] == read(Path("10.jsonl")) * 2
    again, _ = mix(sources, read, seed=42)
    other, _ = mix(sources, read, seed=7)
    assert again == records and other[20:] != records[20:]
    assert shares[1].as_dict(45) == {"path": "100.jsonl", "weight": 0.25, "records": 100, "used": 25, "share": 0.5556}


def test_a_weight_that_takes_nothing_says_the_least_that_would():
    with pytest.raises(ConfigError, match="weight 0.001 takes none of its 10 records; use a weight of at least 0.1"):
        mix([SimpleNamespace(path=Path("10.jsonl"), weight=0.001)], read, seed=1)
