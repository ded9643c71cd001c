"""Registry of curate steps: the executor (`curate run`) knows nothing about the steps.

Each step module exposes `STEP = Step(name, Config, run)` where
    Config               a dataclass (the step's settings, section `curate.<section>` of pipelines.yaml)
    run(cfg, inp, out)   reads `inp` (a folder or file), writes the output folder `out`, and
                         returns its stats dict (the `_stats.json` content: rows_in and per-state counts)
The step's CLI command and `curate run` call the same `run`. Ray is started by the caller.

Optional fusion (`curate run` only; the executor still knows no step by name): when step A is
followed by step B in a pipeline and A has `fuse_next`, the executor offers B to A. A may run
B's per-part work inside its own tasks (saving one write and read of the data) if B is
`fusable`; A then returns both stats, and both folders are as an unfused run leaves them.
    fusable: Fusable        B's per-part kernel, and the columns it needs
    fuse_next(cfg, inp, out, b_step, b_cfg, b_out) -> [A's stats, B's stats], or None to decline
A fusable step's `run` takes `staged=`: a folder of part outputs (data, `_ledger/<task>.parquet`,
`_done/<task>.json`) written by A's tasks, which it adopts (a rename, or a server-side copy on an
object store) instead of recomputing.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable

from core.errors import StepIncomplete  # noqa: F401  (re-exported: steps raise it)

# name -> module that defines STEP. A step has this one name everywhere: the CLI command, the
# pipelines.yaml section `curate.<name>` and pipeline entry, its module and its ledger's `step`.
STEP_MODULES: dict[str, str] = {
    "dedup": "curate.metadata.dedup",
    "filter": "curate.metadata.filter",
    "captions": "curate.metadata.captions",
    "join": "curate.metadata.join",
    "download": "curate.download.step",
    "neardup": "curate.images.neardup",
    "score": "curate.images.score",
}


@dataclass(frozen=True)
class Fusable:
    """How a row-local step (output part i and its ledger depend on input part i only) runs
    inside a previous step's task."""

    required: Callable[[Any], list[str]]  # cfg -> input columns the step needs
    # write(con, cfg, f, src, columns, out, task, attempt, checked=True) -> the task's marker
    # info: decides every row of the duckdb relation `src()` (the rows of input part `f`, with
    # `file_row_number` and `_invalid`) and writes OUT/<task>.parquet and
    # OUT/_ledger/<task>.parquet (names per core.storage.attempt_path) exactly as the step's own
    # task would, listing them in the info's `files`. `checked`: the rows passed the previous
    # step's URL/TEXT checks (curate.metadata.io.invalid_reason_sql), so they need not be redone.
    write: Callable[..., dict[str, Any]]
    task: Callable[[int], str]  # the step's task name for input file number i (sorted path order)


@dataclass(frozen=True)
class Step:
    name: str
    config: type
    run: Callable[..., dict[str, Any]]
    fusable: Fusable | None = None  # set by row-local steps a previous step may run for them
    fuse_next: Callable[..., list[dict[str, Any]] | None] | None = None  # see the module docstring

    @property
    def section(self) -> str:
        """pipelines.yaml section of this step's settings: curate.<name>."""
        return "curate." + self.name


OTHER_SECTIONS = ("synth", "report")  # curate commands with pipelines.yaml settings that are not steps


def check_sections(doc: dict[str, Any]) -> None:
    """A `curate.<name>` section that no command reads (a typo such as `filtr`) is an error,
    not settings silently unused."""
    from core.config import ConfigError, section

    known = [*STEP_MODULES, *OTHER_SECTIONS]
    unknown = sorted(set(section(doc, "curate")) - set(known))
    if unknown:
        raise ConfigError(f"curate: unknown section {unknown[0]!r} (known: {', '.join(known)})")


def get_step(name: str) -> Step:
    if name not in STEP_MODULES:
        raise KeyError(f"unknown curate step {name!r} (known: {', '.join(STEP_MODULES)})")
    return importlib.import_module(STEP_MODULES[name]).STEP
