"""Section "download": why images failed to download, per reason category, with examples (the
ledger's reason and detail, and the URL from img2dataset's per-shard parquet)."""
from __future__ import annotations

from curate.report import plots
from curate.report.context import Context
from curate.report.discover import Folder
from curate.report.html import Html, code, img, join, note, table, tag
from curate.report.query import data_files, scan, sql_str

EXAMPLES = 2  # example failures listed per reason
TOP = 15  # reasons plotted


def build(ctx: Context) -> Html:
    folders = ctx.inv.of("download")
    if not folders:
        return note("No `curate download` folder among the inputs.", "warn")
    return join(_one(ctx, f) for f in folders)


def _one(ctx: Context, f: Folder) -> Html:
    parts = [tag("h3", join([f"download {f.pipeline or ''} ", code(str(f.path))]))]
    if not f.complete:
        parts.append(note(f"{f.status()}: failures recorded so far.", "warn"))
    failures = _failures(ctx, f)
    s = f.stats or {}
    done, _ = f.units()
    parts.append(table(["rows in", "downloaded", "failed", "shards done", "image size", "retry shards"],
                       [[int(s.get("rows_in", 0)) if s else "-", int(s.get("kept", 0)) if s else "-",
                         sum(n for _, n, _ in failures), done, f.settings.get("image_size"), int(s.get("retry_shards", 0))]]))
    if not failures:
        return join(parts + [note("No download failed.")])
    plot = plots.bars([r for r, _, _ in failures[:TOP]], [n for _, n, _ in failures[:TOP]], "failed downloads by reason")
    rows = [[reason, n, join(tag("div", f"{url or '?'}: {detail or ''}") for url, detail in examples)]
            for reason, n, examples in failures]
    return join(parts + [tag("div", join([img(plot, alt="download failure reasons", cls="plot"),
                                          table(["reason", "rows", "examples (URL: detail)"], rows)]), cls="row")])


def _failures(ctx: Context, f: Folder) -> list[tuple[str, int, list[tuple[str | None, str | None]]]]:
    """(reason, rows, [(url, detail)]) per failure reason, most frequent first."""
    ledger = f.path / "_ledger"
    if not any(ledger.glob("*.parquet")):
        return []
    glob = sql_str(str(ledger / "[!_]*.parquet"))
    counts = ctx.con.execute(f"SELECT coalesce(reason, '(none)') AS r, count(*) AS n FROM read_parquet({glob}) "
                             "WHERE state = 'failed' GROUP BY r ORDER BY n DESC, r").fetchall()
    shards = data_files(f.path, "[0-9]*.parquet")
    url = "p.url" if shards else "NULL"
    join_sql = f"LEFT JOIN (SELECT key::VARCHAR AS key, url FROM {scan(shards)}) p ON p.key = l.key" if shards else ""
    examples = ctx.con.execute(
        f"SELECT coalesce(l.reason, '(none)'), {url}, l.value FROM read_parquet({glob}) l {join_sql} "
        f"WHERE l.state = 'failed' QUALIFY row_number() OVER (PARTITION BY l.reason ORDER BY l.source, l.row) <= {EXAMPLES}"
    ).fetchall()
    by_reason: dict[str, list] = {}
    for reason, u, detail in examples:
        by_reason.setdefault(reason, []).append((u, detail))
    return [(r, int(n), by_reason.get(r, [])) for r, n in counts]
