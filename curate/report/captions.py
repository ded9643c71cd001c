"""Section "captions": caption lengths (TEXT and the merged long_caption) and the long-caption
match rate of each `curate captions` folder (its `_stats.json` and output parquet).

Lengths come from a bounded sample (`sample.column_sample`: the first rows of up to 16 row
groups at a fixed stride, about SAMPLE_ROWS rows in all), since reading every caption of a 10M-row folder means
gigabytes of text; row and null counts are exact, from the parquet footers."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from curate.report import plots
from curate.report.context import Context
from curate.report.discover import Folder
from curate.report.html import Html, code, figure, img, join, note, table, tag
from curate.report.query import column, data_files
from curate.report.sample import column_sample

CLIP_QUANTILE = 0.995  # longer captions are counted in the last bin (a few outliers would squash the rest)
SAMPLE_ROWS = 100_000  # caption lengths are read from about this many rows (sample.column_sample)


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
    sample = column_sample(files, stored, SAMPLE_ROWS)
    words = word_counts(sample.values.drop_null())
    present = "?" if sample.nulls is None else f"{sample.rows - sample.nulls:,}"
    if words.size == 0:
        return note(f"{name}: none of the {sample.sampled_rows:,} rows read has one ({present} of {sample.rows:,} in all).", "info")
    hi = int(np.quantile(words, CLIP_QUANTILE))
    edges = word_edges(hi, ctx.cfg.bins)
    counts = np.histogram(np.minimum(words, edges[-1] - 0.5), edges)[0]
    read = "every row" if sample.sampled_rows == sample.rows else f"{sample.sampled_rows:,} rows read at a fixed stride"
    series = [plots.Series(f"{words.size:,} captions", counts, "#1f6fd1")]
    title = f"{name}: words per caption (last bin: ≥ {edges[-2] + 0.5:g})"
    plot = img(plots.histogram(edges, series, title, "words"), alt=f"{name} length histogram", cls="plot")
    return figure(plot, f"{present} of {sample.rows:,} rows have a {name}; lengths from {read}", cls="plotfig")


def word_counts(text: pa.ChunkedArray) -> np.ndarray:
    """Whitespace-separated words of each (non-null) text, as `curate filter --min-words` counts."""
    if len(text) == 0:
        return np.zeros(0, dtype=np.int64)
    trimmed = pc.utf8_trim_whitespace(text)
    n = pc.list_value_length(pc.utf8_split_whitespace(trimmed))
    return pc.if_else(pc.equal(trimmed, ""), 0, n).to_numpy(zero_copy_only=False).astype(np.int64)
