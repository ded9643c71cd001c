"""Imports point one way: curate, pretokenize, train -> core; core imports no stage."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
STAGES = ("curate", "pretokenize", "train")


def imported_packages(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("package", ("core",) + STAGES)
def test_imports_point_one_way(package: str) -> None:
    forbidden = set(STAGES) - {package}
    offenders = {
        str(p.relative_to(ROOT)): sorted(imported_packages(p) & forbidden)
        for p in (ROOT / package).rglob("*.py")
    }
    offenders = {k: v for k, v in offenders.items() if v}
    assert not offenders, f"{package} must not import {sorted(forbidden)}: {offenders}"
