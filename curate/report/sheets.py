"""Section "thresholds": contact sheets of the images just above and just below each filter
threshold, so one sees what a threshold keeps and what it throws away.

Images come from `curate download` folders (their shards' parquet lists each sample's key and
the metadata scores it was downloaded with); where a `curate score` folder read that download
folder, its image-computed scores take precedence. A side with no image says why.
"""
from __future__ import annotations

from pathlib import Path

from curate.report.context import Context
from curate.report.discover import Folder
from curate.report.html import Html, esc, figure, join, note, tag
from curate.report.images import thumb_html, thumbnails
from curate.report.query import column, data_files, ident, scan
from curate.report.thresholds import SCORE_COLUMNS, Threshold, score_thresholds

TABLE = "report_images"  # temp table: one row per downloaded image (tar, key, score columns)


def build(ctx: Context) -> Html:
    marks = _thresholds(ctx)
    if not marks:
        return note("No `curate filter` folder with a score threshold among the inputs.", "warn")
    sources = _load_images(ctx)
    if not sources:
        return note("No `curate download` folder among the inputs: no images to show at the thresholds "
                    f"({', '.join(t.keep_text for t in marks)}).", "warn")
    picks = {t: {side: _pick(ctx, t, side) for side in ("kept", "dropped")} for t in marks}
    wanted: dict[Path, set[str]] = {}
    for sides in picks.values():
        for rows in sides.values():
            for tar, key, _ in rows:
                wanted.setdefault(Path(tar), set()).add(key)
    thumbs = thumbnails(wanted, ctx.cfg.thumb)
    head = note(f"Images from {', '.join(sources)}; {ctx.cfg.images_per_side} per side, nearest the threshold first. "
                "Green: the threshold keeps it; red: the threshold drops it.")
    return join([head] + [_sheet(t, picks[t], thumbs) for t in marks])


def _thresholds(ctx: Context) -> list[Threshold]:
    """Every distinct score threshold of the filter folders, in rule order."""
    seen: dict[tuple[str, float], Threshold] = {}
    for f in ctx.inv.of("filter"):
        for t in score_thresholds(f.settings):
            seen.setdefault((t.column, t.value), t)
    return list(seen.values())


def _load_images(ctx: Context) -> list[str]:
    """Fill TABLE from every download folder; returns a description of each source used."""
    parts, described = [], []
    for d in ctx.inv.of("download"):
        files = data_files(d.path, "[0-9]*.parquet")
        if not files:
            continue
        score = next((s for s in ctx.inv.of("score") if s.input_path and _same(s.input_path, d.path)), None)
        parts.append(_select(ctx, d, files, score))
        described.append(f"{d.path.name}" + (f" (scores from {score.path.name})" if score else " (download metadata scores)"))
    if not parts:
        return []
    ctx.con.execute(f"CREATE OR REPLACE TEMP TABLE {TABLE} AS " + " UNION ALL ".join(parts))
    return described


def _select(ctx: Context, d: Folder, files: list[str], score: Folder | None) -> str:
    """SQL: (tar, key, score columns) of the images one download folder holds."""
    cols = {c: column(ctx.con, files, c) for c in SCORE_COLUMNS}
    tar = "regexp_replace(filename, '\\.parquet$', '.tar')"
    base = ", ".join(f"{ident(stored) if stored else 'NULL'}::DOUBLE AS {c}" for c, stored in cols.items())
    rel = f"(SELECT {tar} AS tar, key::VARCHAR AS key, {base} FROM {scan(files, filename=True)} WHERE status = 'success')"
    score_files = data_files(score.path) if score else []
    if not score_files:
        return f"SELECT * FROM {rel}"
    s_cols = {c: column(ctx.con, score_files, c) for c in SCORE_COLUMNS}
    pick = ", ".join(f"coalesce(s.{ident(s_cols[c])}::DOUBLE, d.{c}) AS {c}" if s_cols[c] else f"d.{c}" for c in SCORE_COLUMNS)
    return (f"SELECT d.tar, d.key, {pick} FROM {rel} d LEFT JOIN {scan(score_files)} s "
            f"ON s.key = d.key AND s.shard = regexp_extract(d.tar, '[^/]+$')")


def _pick(ctx: Context, t: Threshold, side: str) -> list[tuple[str, str, float]]:
    """(tar, key, value) of the images nearest threshold `t` on one side."""
    dropped = t.drop_sql(t.column)
    cond = dropped if side == "dropped" else f"NOT ({dropped})"
    return ctx.con.execute(
        f"SELECT tar, key, {t.column} FROM {TABLE} WHERE isfinite({t.column}) AND {cond} "
        f"ORDER BY abs({t.column} - {t.value!r}), tar, key LIMIT {int(ctx.cfg.images_per_side)}").fetchall()


def _sheet(t: Threshold, sides: dict[str, list], thumbs: dict) -> Html:
    parts = [tag("h3", f"{t.rule}: {t.keep_text}")]
    for side, rows in sides.items():
        label = t.side_text(side)
        if not rows:
            parts.append(tag("p", join([tag("b", label + ": "), _none_text(t, side)]), cls="note warn"))
            continue
        figs = [figure(thumb_html(thumbs.get((tar, key)), key), f"{t.column} {v:.4g} · {key}", cls=side)
                for tar, key, v in rows]
        parts.append(tag("div", join([tag("b", label), tag("div", join(figs), cls="sheet")])))
    return join(parts)


def _none_text(t: Threshold, side: str) -> Html:
    if side == "dropped":
        return esc(f"no downloaded image falls on this side of {t.column} = {t.value:g}. Rows the filter dropped "
                   "were never downloaded (it runs on metadata, before download), and no image scored after "
                   "download lands there.")
    return esc(f"no downloaded image passes {t.keep_text}.")


def _same(a: Path, b: Path) -> bool:
    return Path(a).resolve() == Path(b).resolve()

