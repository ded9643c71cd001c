"""Benchmark of `curate report`: wall time, page size and peak memory over given run folders,
against a same-run baseline: one plain duckdb scan (min/max) of the four score columns of the
largest metadata folder found, the least any exact score histogram must read.

    .venv/bin/python bench/report.py demo                  # the demo's folders
    .venv/bin/curate synth --rows 10000000 --files 16 --output /tmp/big/laion  (then curate run on it)
    .venv/bin/python bench/report.py /tmp/big/out --repeats 3

Each repeat builds the whole page in this process (the duckdb connection is new each time);
peak RSS is this process's maximum over all repeats.
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time
from pathlib import Path

import duckdb

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from curate.report.build import build_report  # noqa: E402
from curate.report.context import ReportConfig  # noqa: E402
from curate.report.discover import discover  # noqa: E402
from curate.report.query import column, data_files, ident, scan  # noqa: E402

SCORES = ("aesthetic", "pwatermark", "punsafe", "similarity")


def baseline_files(paths: list[str]) -> list[str]:
    """The data files of the metadata step folder with the most bytes."""
    folders = [f for f in discover(paths).folders if f.kind in ("dedup", "filter", "captions")]
    sized = [(sum(Path(x).stat().st_size for x in data_files(f.path)), data_files(f.path)) for f in folders]
    return max(sized)[1] if sized else []


def baseline_scan(files: list[str]) -> float:
    con = duckdb.connect()
    con.execute("SET threads = 2")
    cols = [c for c in (column(con, files, n) for n in SCORES) if c]
    start = time.perf_counter()
    con.execute(f"SELECT {', '.join(f'min({ident(c)}), max({ident(c)})' for c in cols)} FROM {scan(files)}").fetchall()
    seconds = time.perf_counter() - start
    con.close()
    return seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("paths", nargs="+")
    ap.add_argument("--out", default="/tmp/bench-report.html")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    files = baseline_files(args.paths)
    runs, base = [], []
    for _ in range(args.repeats):
        if files:
            base.append(baseline_scan(files))
        runs.append(build_report(ReportConfig(), args.paths, args.out))
    secs = [r["seconds"] for r in runs]
    print(json.dumps({
        "report_seconds_median": statistics.median(secs), "report_seconds": secs,
        "baseline_scan_seconds_median": statistics.median(base) if base else None,
        "baseline_rows": duckdb.sql(f"SELECT count(*) FROM {scan(files)}").fetchall()[0][0] if files else None,
        "page_bytes": runs[-1]["bytes"], "folders": len(runs[-1]["folders"]),
        "section_seconds_last": runs[-1]["section_seconds"], "problems": runs[-1]["problems"],
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
    }, indent=1))


if __name__ == "__main__":
    main()
