"""The tree keeps its layers: no import points back, and only mesh/ touches mesh privates."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "waferllm"

# hardware -> mesh -> kernels -> models -> engine -> (calibration, baselines) -> interfaces
RANK = {"errors": 0, "hardware": 1, "mesh": 2, "kernels": 3, "models": 4, "engine": 5, "baselines": 5,
        "calibration": 6, "explore": 6, "interfaces": 7}


def _modules():
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC)
        yield path, (rel.parts[0][:-3] if len(rel.parts) == 1 else rel.parts[0])


def _imports(path: Path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("waferllm"):
            yield node.module, [a.name for a in node.names], node.lineno
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("waferllm"):
                    yield a.name, [], node.lineno


def test_no_import_points_back():
    """Imports at module level and inside functions alike go down the layers (or sideways
    inside a package): calibration may read the engine and the kernels, never the reverse."""
    bad = []
    for path, pkg in _modules():
        if pkg not in RANK:
            continue
        for module, _, line in _imports(path):
            parts = module.split(".")
            target = parts[1] if len(parts) > 1 else "__init__"
            if target not in RANK or target == pkg:
                continue
            allowed = RANK[target] <= RANK[pkg]
            if not allowed:
                bad.append(f"{path.relative_to(SRC)}:{line} imports {module}")
    assert not bad, "\n".join(bad)


def test_only_mesh_uses_private_mesh_names():
    bad = []
    for path, pkg in _modules():
        if pkg == "mesh":
            continue
        for module, names, line in _imports(path):
            if module.startswith("waferllm.mesh"):
                bad += [f"{path.relative_to(SRC)}:{line} imports {module}.{n}" for n in names if n.startswith("_")]
        text = path.read_text()
        for attr in ("._handle", "._allocs", "._tiles", "._overlap", "._group", "._stack"):
            if attr in text:
                bad.append(f"{path.relative_to(SRC)} uses {attr}")
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("rank_pair", [("mesh", "kernels"), ("kernels", "engine"), ("engine", "interfaces")])
def test_ranks_are_ordered(rank_pair):
    low, high = rank_pair
    assert RANK[low] < RANK[high]
