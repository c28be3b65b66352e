"""Imports point one way: cli → train | evals → models, data → config, errors, progress, memory, runs."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).parents[2] / "src" / "shitate"
FORBIDDEN = {
    "train": ("shitate.evals", "shitate.cli"),
    "evals": ("shitate.train", "shitate.cli"),
    "models": ("shitate.train", "shitate.evals", "shitate.cli"),
    "data": ("shitate.train", "shitate.evals", "shitate.models", "shitate.cli"),
}


def imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_a_layer_imports_nothing_above_it(layer):
    offenders = [f"{path.relative_to(PACKAGE)} imports {name}"
                 for path in sorted((PACKAGE / layer).rglob("*.py")) for name in imported_modules(path)
                 if name.startswith(FORBIDDEN[layer])]
    assert not offenders


def test_the_core_imports_no_stage():
    for core in ("config.py", "errors.py", "progress.py", "memory.py", "runs.py"):
        assert not [n for n in imported_modules(PACKAGE / core)
                    if n.startswith(("shitate.data", "shitate.models", "shitate.train", "shitate.evals", "shitate.cli"))]
