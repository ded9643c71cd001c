"""`curate report`: one self-contained HTML page about whatever run folders it is given.

    build_report(cfg, ["demo"], "demo/report.html") -> {"path", "bytes", "seconds", "sections", ...}

It finds the folders by their records (`discover`), builds each section from their files
(one module per section, each robust to missing or unfinished data) and writes the page
atomically. It reads every stage's files but imports only `core` and curate's own filter
rules: never `pretokenize` or `train` (tests/test_architecture.py).
"""
from __future__ import annotations

import os
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from core import atomic
from core.errors import UserError

from curate.report import captions, codes, download, folders, funnel, neardup, scores, sheets, training
from curate.report.context import Context, ReportConfig
from curate.report.discover import discover
from curate.report.html import Html, Section, page
from curate.report.query import connect

# (id, title, builder) in page order; every section is always present (it says when it has no data).
SECTIONS: list[tuple[str, str, Callable[[Context], Html]]] = [
    ("funnel", "Funnel", funnel.build),
    ("scores", "Score histograms", scores.build),
    ("captions", "Captions", captions.build),
    ("thresholds", "At the thresholds", sheets.build),
    ("neardup", "Near-duplicates", neardup.build),
    ("download", "Download failures", download.build),
    ("pretokenize", "Pretokenize", codes.build),
    ("training", "Training", training.build),
    ("folders", "Run folders and settings", folders.build),
]


def build_report(cfg: ReportConfig, paths: list[str | os.PathLike], out: str | os.PathLike) -> dict[str, Any]:
    """Write the report of the run folders in or below `paths` to `out`; returns what it did."""
    start = time.perf_counter()
    _check_output(Path(out))
    inv = discover(paths)
    if not inv.folders:
        raise UserError("; ".join(inv.problems))
    con = connect(cfg.threads, cfg.memory)
    con.execute("SET enable_progress_bar = false")
    ctx = Context(cfg, inv, con)
    sections, timings = [], {}
    try:
        for sid, title, fn in SECTIONS:
            t0 = time.perf_counter()
            sections.append(Section(sid, title, ctx.guard(title, fn, ctx)))
            timings[sid] = round(time.perf_counter() - t0, 3)
    finally:
        con.close()
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    subtitle = f"{len(inv.folders)} run folders from {', '.join(map(str, paths))} · made {when} by curate report"
    text = page("Tessera run report", subtitle, sections)
    try:
        atomic.write_text(out, text)
    except OSError as exc:
        raise UserError(f"{out}: cannot write the page ({exc.strerror or exc})") from None
    return {"path": str(Path(out)), "bytes": len(text.encode()), "seconds": round(time.perf_counter() - start, 3),
            "sections": [s.id for s in sections], "section_seconds": timings, "folders": [str(f.path) for f in inv.folders],
            "problems": inv.problems + ctx.problems}


def _check_output(out: Path) -> None:
    """Refuse, before any work, an output that is a folder or lies under a file."""
    if out.is_dir():
        raise UserError(f"{out}: is a folder; -o names the HTML file to write, e.g. {out / 'report.html'}")
    blocker = atomic.file_in_the_way(out)
    if blocker is not None:
        raise UserError(f"{out}: cannot be written: {blocker} is a file")
