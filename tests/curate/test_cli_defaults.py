"""Every `[default: x]` a curate step's --help states is what the step runs with when the flag
is not given: the code default, or the shipped pipelines.yaml's value where it sets one
(`--resize-mode` once said center_crop while downloads ran keep_ratio)."""
from __future__ import annotations

import dataclasses
import inspect
import re
from pathlib import Path

import pytest

from core import config
from curate.cli import app
from curate.steps import get_step

REPO = Path(__file__).resolve().parents[2]
DEFAULT = re.compile(r"\[default: ([^\]\s]+)\]$")  # one word; descriptive defaults are not checked


def _stated_defaults() -> list[tuple[str, str, str, object]]:
    """(command, option, stated default, effective default) for every step command's option
    whose help ends in a one-word `[default: x]` and that names a field of the step's config."""
    doc = config.load_yaml(REPO / "pipelines.yaml")
    out = []
    for info in app.registered_commands:
        name = info.name or info.callback.__name__
        try:
            step = get_step(name)
        except Exception:  # synth, run, report: not steps
            continue
        fields = {f.name: f for f in dataclasses.fields(step.config)}
        shipped = config.section(doc, step.section)
        for param, p in inspect.signature(info.callback).parameters.items():
            m = DEFAULT.search(getattr(p.default, "help", None) or "")
            if not m or param not in fields:
                continue
            f = fields[param]
            code = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
            out.append((name, param, m[1], shipped.get(param, code)))
    return out


def _same(stated: str, value: object) -> bool:
    if stated == "off":
        return value is None or value is False
    if stated == "automatic":  # None = the step chooses
        return value is None
    if stated == "on":
        return value is True
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(stated) == float(value)
    return stated == str(value)


def test_there_are_stated_defaults_to_check() -> None:
    stated = {(cmd, opt) for cmd, opt, _, _ in _stated_defaults()}
    assert {("filter", "aesthetic"), ("download", "resize_mode"), ("score", "batch_size")} <= stated
    assert len(stated) > 40


@pytest.mark.parametrize("cmd, option, stated, value", _stated_defaults())
def test_stated_default_is_the_effective_one(cmd: str, option: str, stated: str, value: object) -> None:
    assert _same(stated, value), f"curate {cmd} --{option.replace('_', '-')}: help says {stated}, runs with {value!r}"


def test_the_check_catches_a_wrong_default() -> None:
    assert not _same("center_crop", "keep_ratio") and not _same("off", True) and not _same("512", 256)
    assert _same("off", None) and _same("on", True) and _same("4.5", 4.5) and _same("1GB", "1GB")
