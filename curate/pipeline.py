"""`curate run`: the steps of a named pipeline from `pipelines.yaml`, in order, each reading the
previous one's output. The executor knows nothing about the steps: it looks each one up in
`curate.steps`, builds its config (code defaults < `curate.<step>` section < the pipeline
entry's overrides), and calls `run(cfg, inp, out)`.

    pipelines:
      demo:
        input: demo/laion           # parquet file, folder or glob
        output: demo/out            # step i writes <output>/<step name> (local, s3:// or gs://)
        steps:
          - dedup
          - {step: filter, aesthetic: 5.0}   # a mapping overrides that step's settings

A step followed by a step it can fuse with (`Step.fuse_next`, `Step.fusable`; e.g. dedup then
filter) runs both in one pass; both output folders are the same as when they run apart.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Mapping

from rich.console import Console
from rich.table import Table

from core import atomic, config, ledger, storage
from core.storage import AnyPath
from curate.steps import Step, get_step


@dataclass
class PipelineConfig:
    input: str = ""  # the first step's input: a parquet file, folder or glob
    output: str = ""  # root folder; each step writes <output>/<step name>
    steps: list = field(default_factory=list)  # step names, or mappings {step: NAME, ...overrides}

    def __post_init__(self) -> None:
        if not self.input or not self.output:
            raise ValueError("a pipeline needs `input` and `output`")
        if not self.steps:
            raise ValueError("a pipeline needs at least one entry in `steps`")


@dataclass(frozen=True)
class PlannedStep:
    step: Step
    cfg: Any
    out: AnyPath  # an absolute local path or an object-store URI (core.storage)


def _entry(entry: Any, where: str) -> tuple[str, dict[str, Any]]:
    """A steps entry -> (name, overrides)."""
    if isinstance(entry, str):
        return entry, {}
    if isinstance(entry, Mapping) and isinstance(entry.get("step"), str):
        return entry["step"], {k: v for k, v in entry.items() if k != "step"}
    raise config.ConfigError(f"{where}: a step is a name or a mapping with a `step` key, got {entry!r}")


def _lookup(name: str, where: str) -> Step:
    try:
        return get_step(name)
    except KeyError as exc:
        raise config.ConfigError(f"{where}: {exc.args[0]}") from exc
    except ImportError as exc:
        raise config.ConfigError(f"{where}: step {name!r} cannot be loaded ({exc})") from exc


def plan(doc: Mapping[str, Any], name: str) -> tuple[PipelineConfig, list[PlannedStep]]:
    """Resolve every step's config before anything runs, so a typo fails in seconds."""
    pipelines = config.section(doc, "pipelines")
    if name not in pipelines:
        raise config.ConfigError(f"unknown pipeline {name!r} (defined: {', '.join(pipelines) or 'none'})")
    pipe = config.build(PipelineConfig, pipelines[name], f"pipelines.{name}")
    planned, seen = [], {}
    for i, entry in enumerate(pipe.steps):
        where = f"pipelines.{name}.steps[{i}]"
        step_name, overrides = _entry(entry, where)
        step = _lookup(step_name, where)
        cfg = config.merge(step.config, config.section(doc, step.section), overrides, where=where)
        seen[step_name] = seen.get(step_name, 0) + 1
        folder = step_name if seen[step_name] == 1 else f"{step_name}-{seen[step_name]}"
        planned.append(PlannedStep(step, cfg, storage.path(pipe.output) / folder))
    return pipe, planned


def run(doc: Mapping[str, Any], name: str, console: Console | None = None) -> list[dict[str, Any]]:
    """Run pipeline `name` of the loaded pipelines.yaml `doc`; returns each step's stats."""
    console = console or Console()
    pipe, planned = plan(doc, name)
    inp, results, i = pipe.input, [], 0
    while i < len(planned):
        p, nxt = planned[i], planned[i + 1] if i + 1 < len(planned) else None
        names = p.step.name + (f" + {nxt.step.name}" if _fusable(p, nxt) else "")
        console.rule(f"[bold]step {i + 1}/{len(planned)}: {names}[/bold] -> {p.out}")
        start = time.perf_counter()
        fused = _fuse(p, nxt, str(inp)) if _fusable(p, nxt) else None
        done = [p, nxt] if fused else [p]
        for q, stats in zip(done, fused or [p.step.run(p.cfg, str(inp), str(p.out))]):
            brief = {k: v for k, v in stats.items() if k not in ("parts", "ledger")}  # file lists stay in _stats.json
            results.append(dict(brief, step=q.step.name, output=str(q.out)))
        results[-len(done)].update(seconds=round(time.perf_counter() - start, 3))
        if fused:  # one pass did both: the time is the first step's, the second says so
            results[-1].update(seconds=0.0, fused_into=p.step.name)
        inp, i = done[-1].out, i + len(done)
    atomic.write_json(storage.path(pipe.output) / "_summary.json", {"pipeline": name, "steps": results})
    console.print(summary_table(name, results))
    return results


def _fusable(p: PlannedStep, nxt: PlannedStep | None) -> bool:
    return nxt is not None and p.step.fuse_next is not None and nxt.step.fusable is not None


def _fuse(p: PlannedStep, nxt: PlannedStep, inp: str) -> list[dict[str, Any]] | None:
    """Both steps' stats when `p` ran `nxt` inside its own tasks; None when it declined."""
    return p.step.fuse_next(p.cfg, inp, str(p.out), nxt.step, nxt.cfg, str(nxt.out))


def summary_table(name: str, results: list[dict[str, Any]]) -> Table:
    """One row per step: rows in, each ledger state, seconds (outputs in the caption)."""
    table = Table(title=f"pipeline {name}", caption="outputs: " + ", ".join(s["output"] for s in results))
    for col in ("step", "rows in", *ledger.STATES, "seconds"):
        table.add_column(col, justify="left" if col == "step" else "right", no_wrap=True)
    for s in results:
        counts = [f"{int(s.get(k, 0)):,}" for k in ("rows_in", *ledger.STATES)]
        secs = f"in {s['fused_into']}" if s.get("fused_into") else f"{s['seconds']:.1f}"
        table.add_row(s["step"], *counts, secs)
    return table
