"""Section "captions": caption lengths (TEXT and the merged long_caption) and the long-caption
match rate of each `curate captions` folder (its `_stats.json` and output parquet)."""
from __future__ import annotations

from curate.report import plots
from curate.report.context import Context
from curate.report.discover import Folder
from curate.report.html import Html, code, img, join, note, table, tag
import numpy as np

from curate.report.query import column, counts, data_files, ident, scan

CLIP_QUANTILE = 0.995  # longer captions are counted in the last bin (a few outliers would squash the rest)


def words_sql(x: str) -> str:
    """Words of a text column: spaces + 1 after trimming (exact for the normalised long
    captions, whose whitespace runs are single spaces; close for raw TEXT)."""
    t = f"trim({x})"
    return f"CASE WHEN {x} IS NULL THEN NULL WHEN {t} = '' THEN 0 ELSE length({t}) - length(replace({t}, ' ', '')) + 1 END"


def word_edges(hi: int, bins: int) -> np.ndarray:
    """Bins of whole words covering 0..hi, at most `bins` of them: edges at -0.5, w-0.5, ..."""
    width = max(1, -(-(hi + 1) // bins))
    return np.arange(0, hi + width + 1, width, dtype=np.float64) - 0.5


def build(ctx: Context) -> Html:
    folders = ctx.inv.of("captions")
    if not folders:
        return note("No `curate captions` folder among the inputs: no long-caption match rate to show.", "warn")
    return join(_one(ctx, f) for f in folders)


def _one(ctx: Context, f: Folder) -> Html:
    head = [tag("h3", join([f"captions {f.pipeline or ''} ", code(str(f.path))]))]
    if f.complete:
        head.append(_rates(f))
    else:
        head.append(note(f"{f.status()}: the match rate is written when the step finishes.", "warn"))
    files = data_files(f.path)
    if not files:
        return join(head + [note("No output parquet yet.", "warn")])
    figs = [_plot(ctx, files, name) for name in ("TEXT", "long_caption")]
    return join(head + [tag("div", join(figs), cls="row")])


def _rates(f: Folder) -> Html:
    s, settings = f.stats or {}, f.settings
    rows = [["rows", int(s.get("rows_in", 0))],
            ["matched a long caption", f"{int(s.get('matched', 0)):,} ({100 * float(s.get('match_rate', 0)):.1f}%)"],
            ["caption table rows", int(s.get("caption_rows", 0))],
            [f"too short (< {settings.get('min_words', '?')} words, not used)", int(s.get("too_short", 0))],
            ["distinct keys with a caption", int(s.get("keys", 0))],
            ["keys with several candidates (longest kept)", int(s.get("one_to_many_keys", 0))]]
    return table(["long captions", ""], rows)


def _plot(ctx: Context, files: list[str], name: str) -> Html:
    stored = column(ctx.con, files, name)
    if stored is None:
        return note(f"No {name} column in the output.", "warn")
    src = f"(SELECT {words_sql(ident(stored))} AS w FROM {scan(files)})"
    n, present, hi = ctx.con.execute(
        f"SELECT count(*), count(w), approx_quantile(w, {CLIP_QUANTILE}) FROM {src}").fetchone()
    if not present:
        return note(f"{name}: no row has one ({n:,} rows).", "info")
    edges = word_edges(int(hi), ctx.cfg.bins)
    series = [plots.Series(f"{present:,} of {n:,} rows have one", counts(ctx.con, src, "w", edges), "#1f6fd1")]
    title = f"{name}: words per caption (last bin: ≥ {hi:g})"
    return img(plots.histogram(edges, series, title, "words"), alt=f"{name} length histogram", cls="plot")
