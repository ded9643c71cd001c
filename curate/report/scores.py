"""Section "scores": aesthetic, pwatermark, punsafe and similarity histograms before (the filter
step's input) and after (its output) filtering, with the filter's thresholds drawn.

Exact counts by duckdb over the parquet files (query.histograms), not a sample: per side one
scan for the four ranges, then one GROUP BY on the bin number per column.
"""
from __future__ import annotations

from pathlib import Path

from curate.report import plots
from curate.report.context import Context
from curate.report.discover import Folder
from curate.report.html import Html, code, img, join, note, tag
from curate.report.query import Histogram, column, data_files, histograms, ident, scan, sql_str
from curate.report.thresholds import SCORE_COLUMNS, Threshold, score_thresholds

BEFORE, AFTER = "#c9ced6", "#1f6fd1"


def build(ctx: Context) -> Html:
    filters = ctx.inv.of("filter")
    if not filters:
        return note("No `curate filter` folder among the inputs: nothing to compare before and after.", "warn")
    return join(_one(ctx, f) for f in filters)


def input_files(ctx: Context, f: Folder) -> list[str]:
    """The files the filter read: its recorded input folder's, else the ledger's sources."""
    if f.input_path is not None and f.input_path.is_dir():
        return data_files(f.input_path)
    glob = sql_str(str(f.path / "_ledger" / "[!_]*.parquet"))
    if not any((f.path / "_ledger").glob("*.parquet")):
        return []
    sources = [r[0] for r in ctx.con.execute(f"SELECT DISTINCT source FROM read_parquet({glob}) ORDER BY 1").fetchall()]
    return [s for s in sources if Path(s).is_file()]


def _one(ctx: Context, f: Folder) -> Html:
    title = tag("h3", join([f"filter {f.pipeline or ''} ", code(str(f.path))]))
    before, after = input_files(ctx, f), data_files(f.path)
    if not before:
        return title + note("The filter's input files are gone: no 'before' histogram.", "warn")
    head = [title]
    if not f.complete:
        head.append(note(f"{f.status()}: 'after' holds the parts written so far.", "warn"))
    stored = {n: c for n in SCORE_COLUMNS if (c := column(ctx.con, before, n))}
    if not stored:
        return join(head) + note("The filter's input has none of the columns " + ", ".join(SCORE_COLUMNS) + ".", "warn")
    sides = {"before": _relation(before, stored)}
    if after:
        sides["after"] = _relation(after, {n: column(ctx.con, after, n) for n in stored})
    marks = {t.column: t for t in score_thresholds(f.settings)}
    hists = histograms(ctx.con, sides, {n: n for n in stored}, ctx.cfg.bins, {n: [t.value] for n, t in marks.items()})
    return join(head + [tag("div", join(_plot(n, hists[n], marks.get(n)) for n in stored), cls="row")])


def _relation(files: list[str], stored: dict[str, str | None]) -> str:
    """The score columns of `files` under their LAION names (NULL where a file set lacks one)."""
    cols = ", ".join(f"{ident(c) if c else 'NULL'} AS {n}" for n, c in stored.items())
    return f"(SELECT {cols} FROM {scan(files)})"


def _plot(name: str, h: Histogram | None, mark: Threshold | None) -> Html:
    if h is None:
        return note(f"{name}: no finite value in the filter's input.", "warn")
    series = [plots.Series(f"{side}: {h.rows[side] - h.missing[side]:,} rows", h.counts[side], BEFORE if side == "before" else AFTER)
              for side in h.counts]
    lines = [(mark.value, f"{mark.keep_text} ({mark.rule})")] if mark else []
    missing = ", ".join(f"{side} {n:,}" for side, n in h.missing.items() if n)
    title = name + (f" (missing: {missing})" if missing else "") + ("" if mark else " (no threshold)")
    return img(plots.histogram(h.edges, series, title, name, lines), alt=f"{name} histogram", cls="plot")
