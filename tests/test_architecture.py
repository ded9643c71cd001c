"""The layout, enforced: imports point one way, the curate subpackages stand alone, and what
crosses a stage boundary (LAION's hash, image decoding) has its one home in core."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from core.config import parse_yaml

ROOT = Path(__file__).resolve().parent.parent
STAGES = ("curate", "pretokenize", "train")
CURATE_SUBPACKAGES = ("metadata", "download", "images")


def modules_of(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


def imported_modules(path: Path) -> set[str]:
    """Dotted names of every module `path` imports (relative imports resolved)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    parts = path.relative_to(ROOT).with_suffix("").parts
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(parts[: len(parts) - node.level] + ((base,) if base else ()))
            names.update(f"{base}.{a.name}" for a in node.names)
            names.add(base)
    return names


@pytest.mark.parametrize("package", ("core",) + STAGES)
def test_imports_point_one_way(package: str) -> None:
    forbidden = set(STAGES) - {package}
    offenders = {str(p.relative_to(ROOT)): sorted({m.split(".")[0] for m in imported_modules(p)} & forbidden)
                 for p in modules_of(package)}
    offenders = {k: v for k, v in offenders.items() if v}
    assert not offenders, f"{package} must not import {sorted(forbidden)}: {offenders}"


@pytest.mark.parametrize("sub", CURATE_SUBPACKAGES)
def test_curate_subpackages_share_only_core_and_the_step_registry(sub: str) -> None:
    others = [f"curate.{o}" for o in CURATE_SUBPACKAGES if o != sub] + ["curate.cli", "curate.pipeline"]
    offenders = {}
    for p in modules_of(f"curate/{sub}"):
        bad = sorted(m for m in imported_modules(p) if any(m == o or m.startswith(o + ".") for o in others))
        if bad:
            offenders[str(p.relative_to(ROOT))] = bad
    assert not offenders, f"curate/{sub} imports another curate subpackage: {offenders}"


def _calls(path: Path) -> list[str]:
    """Dotted names of the functions `path` calls (`Image.open`, `cv2.imdecode`, ...)."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call):
            parts, f = [], node.func
            while isinstance(f, ast.Attribute):
                parts.append(f.attr)
                f = f.value
            if isinstance(f, ast.Name):
                out.append(".".join([f.id, *reversed(parts)]))
    return out


OUTSIDE_CORE = [p for pkg in STAGES + ("scripts",) for p in modules_of(pkg)]


def test_only_core_computes_the_laion_hash() -> None:
    offenders = [str(p.relative_to(ROOT)) for p in OUTSIDE_CORE
                 if "mmh3" in {m.split(".")[0] for m in imported_modules(p)}]
    assert not offenders, f"LAION's hash is core.laion.hash64 / row_hash; computed in: {offenders}"


def test_only_core_opens_images() -> None:
    decoders = {"Image.open", "PIL.Image.open", "cv2.imread", "cv2.imdecode", "imageio.imread"}
    offenders = {str(p.relative_to(ROOT)): sorted(set(_calls(p)) & decoders) for p in OUTSIDE_CORE}
    offenders = {k: v for k, v in offenders.items() if v}
    assert not offenders, f"images are decoded by core.image; opened directly in: {offenders}"


def test_img2dataset_is_imported_only_by_the_download_subprocess() -> None:
    importers = sorted(str(p.relative_to(ROOT)) for pkg in ("core",) + STAGES for p in modules_of(pkg)
                       if "img2dataset" in {m.split(".")[0] for m in imported_modules(p)})
    assert importers == ["curate/download/engine.py"]
    code = ("import sys, curate.cli, curate.download.step, curate.pipeline; "
            "from curate.steps import get_step; [get_step(n) for n in ('dedup', 'download', 'neardup', 'score')]; "
            "print('img2dataset' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "False"  # the driver never loads it


def test_each_step_has_one_name_everywhere() -> None:
    from typer.main import get_command

    from curate.cli import app
    from curate.steps import STEP_MODULES, get_step

    commands = set(get_command(app).commands)
    sections = parse_yaml((ROOT / "pipelines.yaml").read_text())["curate"]
    for name, module in STEP_MODULES.items():
        step = get_step(name)
        assert step.name == name and name in module.split("."), (name, module)
        assert name in commands, f"no `curate {name}` command"
        assert step.section == f"curate.{name}" and name in sections, f"no curate.{name} in pipelines.yaml"


def test_the_report_reads_every_stage_but_imports_only_core_and_curate_definitions() -> None:
    """curate/report reads pretokenize's and train's files (check.json, metrics.jsonl, PNGs)
    through core; from curate it takes only the filter's rule table and the duckdb set-up."""
    allowed = ("curate.report", "curate.metadata.filter", "curate.metadata.io")
    offenders = {}
    for p in modules_of("curate/report"):
        bad = sorted(m for m in imported_modules(p)
                     if m.split(".")[0] in STAGES and m != "curate"
                     and not any(m == a or m.startswith(a + ".") for a in allowed))
        if bad:
            offenders[str(p.relative_to(ROOT))] = bad
    assert modules_of("curate/report") and not offenders, offenders
