"""Registry of curate steps: the executor (`curate run`) knows nothing about the steps.

Each step module exposes `STEP = Step(name, Config, run)` where
    Config               a dataclass (the step's settings, section `curate.<section>` of pipelines.yaml)
    run(cfg, inp, out)   reads `inp` (a folder or file), writes the output folder `out`, and
                         returns its stats dict (the `_stats.json` content: rows_in and per-state counts)
The step's CLI command and `curate run` call the same `run`. Ray is started by the caller.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable

# name -> module that defines STEP. Names are what pipelines.yaml lists.
STEP_MODULES: dict[str, str] = {
    "dedup": "curate.dedup",
    "filter": "curate.filter",
    "captions": "curate.captions",
    "download": "curate.download",
    "near-dup": "curate.neardup",
    "score": "curate.score",
}


@dataclass(frozen=True)
class Step:
    name: str
    config: type
    run: Callable[[Any, str, str], dict[str, Any]]

    @property
    def section(self) -> str:
        """pipelines.yaml section of this step's settings: curate.<name with _>."""
        return "curate." + self.name.replace("-", "_")


def get_step(name: str) -> Step:
    if name not in STEP_MODULES:
        raise KeyError(f"unknown curate step {name!r} (known: {', '.join(STEP_MODULES)})")
    return importlib.import_module(STEP_MODULES[name]).STEP
