"""Section "training": the loss curve (RUN/metrics.jsonl), the sample grids over the steps
(RUN/samples/step_N.png) and the run's resolved config (RUN/_config.yaml), per train run folder.
"""
from __future__ import annotations

import statistics
from typing import Any

import yaml

from core.trainlog import METRICS, read_records, sample_grids

from curate.report import plots
from curate.report.context import Context
from curate.report.discover import Folder
from curate.report.html import Html, code, details, esc, figure, img, join, note, pre, table, tag
from curate.report.images import embed_file

ZOOM = 256  # sample grids shorter than this (4 images of 64 px) are enlarged, pixels kept sharp


def build(ctx: Context) -> Html:
    runs = ctx.inv.of("train")
    if not runs:
        return note("No train run folder (metrics.jsonl, samples/, _config.yaml) among the inputs.", "warn")
    return join(_one(ctx, f) for f in runs)


def _one(ctx: Context, f: Folder) -> Html:
    stage = dict((f.config.get("config") or {}).get("stage") or {})
    stage.setdefault("steps", (f.config.get("info") or {}).get("steps", "?"))  # the run's step target, outside its identity
    parts = [tag("h3", join([f"{f.step} ", code(str(f.path))]))]
    bad: list[int] = []
    records = [r for r in read_records(f.path, bad) if isinstance(r.get("loss"), (int, float))]
    if bad:  # the curve is drawn from the lines that read
        parts.append(ctx.problem(f"Training: {f.path / METRICS}",
                                 f"{len(bad)} damaged line(s) (first: line {bad[0]}) left out of the loss curve", "warn"))
    parts.append(_summary(records, stage))
    if records:
        steps = [r["step"] for r in records]
        parts.append(img(plots.curve(steps, {"loss": [r["loss"] for r in records]}, "training loss (masked-token cross-entropy)",
                                     "optimizer step"), alt="loss curve", cls="plot"))
    else:
        parts.append(note("No loss logged yet.", "warn"))
    parts.append(_grids(ctx, f, stage, records))
    if f.config:
        parts.append(details("resolved config (_config.yaml)", pre(yaml.safe_dump(f.config, sort_keys=False))))
    else:
        parts.append(note("No _config.yaml in the run folder.", "warn"))
    return join(parts)


def _summary(records: list[dict[str, Any]], stage: dict[str, Any]) -> Html:
    if not records:
        return Html("")
    rate = [r["samples_per_s"] for r in records if isinstance(r.get("samples_per_s"), (int, float))]
    return table(["steps logged", "last step", "of", "first loss", "last loss", "lowest loss", "samples/s (median)"],
                 [[len(records), int(records[-1]["step"]), stage.get("steps", "?"), float(records[0]["loss"]),
                   float(records[-1]["loss"]), float(min(r["loss"] for r in records)),
                   float(statistics.median(rate)) if rate else "-"]])


def _grids(ctx: Context, f: Folder, stage: dict[str, Any], records: list[dict[str, Any]]) -> Html:
    grids = sample_grids(f.path)
    if not grids:
        return note("No sample grid yet (RUN/samples/step_N.png, written every `sample.every` steps).", "warn")
    shown = [grids[i] for i in spread(len(grids), ctx.cfg.sample_grids)]
    prompts = (stage.get("sample") or {}).get("prompts") or []
    head = tag("p", f"Sample grids at {len(shown)} of {len(grids)} steps" +
               (f"; prompts: {' | '.join(map(str, prompts))}" if prompts else ""))
    loss = {r["step"]: r["loss"] for r in records}
    figs = [figure(embed_file(p, ctx.cfg.max_image_width, f"step {s}", min_height=ZOOM),
                   f"step {s:,}" + (f" · loss {loss[s]:.3f}" if s in loss else "")) for s, p in shown]
    return join([head, tag("div", join(figs))])


def spread(total: int, n: int) -> list[int]:
    """Up to `n` indices spread evenly over range(total), first and last included."""
    if total <= 0 or n <= 0:
        return []
    if n == 1 or total == 1:
        return [total - 1]
    return sorted({round(i * (total - 1) / (min(n, total) - 1)) for i in range(min(n, total))})
