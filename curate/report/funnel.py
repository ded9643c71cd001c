"""Section "funnel": rows in, kept and dropped per step and per reason, from each step's
completion record (`_stats.json`) and its ledger (`_ledger/*.parquet`, one row per input row).

An unfinished step (no `_stats.json`) is shown with the ledger parts it has written so far.
"""
from __future__ import annotations

from core.ledger import LEDGER_DIR, STATES, counts

from curate.report.context import READ_ERRORS, Context
from curate.report.discover import Folder
from curate.report.html import Html, join, note, table, tag
from curate.report.query import sql_str

LEDGER_KINDS = ("dedup", "filter", "captions", "download", "neardup", "score", "pretokenize")
TOP_REASONS = 6  # reasons listed per step; the rest are summed as "other"
BAR_PX = 260  # bar length of the first step's rows in


def build(ctx: Context) -> Html:
    folders = ctx.inv.of(*LEDGER_KINDS)
    if not folders:
        return note("No step folder with a ledger among the inputs (curate steps or pretokenize).", "warn")
    groups: dict[str, list[Folder]] = {}
    for f in folders:
        groups.setdefault(f.pipeline or "", []).append(f)
    legend = tag("p", join([Html('<span class="key">')] + [
        Html(f'<span class="s-{s}"></span>{s}') for s in STATES] + [Html("</span>")]))
    parts = [legend]
    for name, members in groups.items():
        parts.append(tag("h3", f"pipeline {name}" if name else "step folders outside a pipeline" if len(groups) > 1 else "step folders"))
        parts.append(_table(ctx, members))
    return join(parts)


def state_counts(f: Folder) -> dict[str, int]:
    """Counts per state: the completion record's, or (unfinished) what the ledger holds so far."""
    if f.stats is not None:
        return {"rows_in": int(f.stats.get("rows_in", 0)), **{s: int(f.stats.get(s, 0)) for s in STATES}}
    so_far = counts(f.path)
    return {"rows_in": sum(so_far.values()), **so_far}


def reasons(ctx: Context, f: Folder) -> list[tuple[str, str, int]]:
    """(state, reason, rows) of every dropped row, most frequent first."""
    if not any((f.path / LEDGER_DIR).glob("*.parquet")):
        return []
    glob = sql_str(str(f.path / LEDGER_DIR / "[!_]*.parquet"))
    return ctx.con.execute(
        f"SELECT state, coalesce(reason, '(none)'), count(*) AS n FROM read_parquet({glob}) "
        "WHERE state <> 'kept' GROUP BY ALL ORDER BY n DESC, 2").fetchall()


def _table(ctx: Context, folders: list[Folder]) -> Html:
    rows, scale = [], None
    for f in folders:
        step = tag("b", f.step) if f.complete else join([tag("b", f.step), tag("div", f.status(), cls="note warn")])
        seconds = f"in {f.fused_into}" if f.fused_into else ("" if f.seconds is None else f"{f.seconds:.1f}")
        try:
            c, why = state_counts(f), reasons(ctx, f)
        except READ_ERRORS as exc:  # one damaged ledger costs its own row, not the section
            rows.append([step, "", *["" for _ in STATES], "", ctx.problem(f"Funnel: {f.path}", exc), seconds])
            continue
        scale = scale or c["rows_in"] or 1  # bars are drawn against the first step's rows in
        rows.append([step, c["rows_in"], *[c[s] for s in STATES], _bar(c, scale), _reason_list(why), seconds])
    return table(["step", "rows in", *STATES, "", "dropped: reasons", "seconds"], rows)


def _bar(c: dict[str, int], scale: int) -> Html:
    """A stacked bar of the states, its length the step's rows in against the first step's."""
    width = max(2.0, BAR_PX * c["rows_in"] / scale)
    spans = "".join(f'<span class="s-{s}" style="width:{100.0 * c[s] / max(1, c["rows_in"]):.3f}%" '
                    f'title="{s}: {c[s]:,}"></span>' for s in STATES if c[s])
    return Html(f'<div class="bar" style="width:{width:.1f}px">{spans}</div>')


def _reason_list(items: list[tuple[str, str, int]]) -> Html:
    if not items:
        return Html("")
    shown = [f"{reason} ({state}): {n:,}" for state, reason, n in items[:TOP_REASONS]]
    rest = sum(n for _, _, n in items[TOP_REASONS:])
    if rest:
        shown.append(f"{len(items) - TOP_REASONS} other reasons: {rest:,}")
    return join(tag("div", line) for line in shown)
