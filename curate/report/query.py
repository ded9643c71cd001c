"""duckdb over a run folder's parquet files: exact histograms and counts in bounded memory.

Nothing is loaded into Python row by row: a histogram is two aggregate scans (range, then
duckdb's `histogram(x, boundaries)`) reading only the columns it needs, under the
connection's memory limit, so a 10M-row folder costs seconds and a few hundred MB.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import duckdb
import numpy as np

from core.laion import stored_name
from curate.metadata.io import connect, sql_str  # noqa: F401  (connect: the project's duckdb set-up)


def data_files(folder: Path, pattern: str = "*.parquet") -> list[str]:
    """A folder's data files at the top level (bookkeeping `_*` and hidden names skipped)."""
    return sorted(str(p) for p in Path(folder).glob(pattern) if not p.name.startswith(("_", ".")))


def scan(files: list[str], filename: bool = False) -> str:
    """SQL relation over parquet files whose schemas may differ (columns unified by name);
    `filename`: with each row's file path as column `filename`."""
    extra = ", filename = true" if filename else ""
    return f"read_parquet([{', '.join(sql_str(f) for f in files)}], union_by_name = true{extra})"


def columns(con: duckdb.DuckDBPyConnection, files: list[str]) -> list[str]:
    return [r[0] for r in con.execute(f"DESCRIBE SELECT * FROM {scan(files)}").fetchall()]


def column(con: duckdb.DuckDBPyConnection, files: list[str], name: str) -> str | None:
    """The stored name of LAION column `name` in these files (aesthetic may be AESTHETIC_SCORE)."""
    return stored_name(columns(con, files), name) if files else None


def ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


@dataclass(frozen=True)
class Histogram:
    edges: np.ndarray  # (bins + 1,) shared by every side
    counts: dict[str, np.ndarray]  # side ("before", "after") -> (bins,) rows per bin
    rows: dict[str, int]  # side -> rows scanned
    missing: dict[str, int]  # side -> rows whose value is null, NaN or infinite


def value_range(con: duckdb.DuckDBPyConnection, src: str, expr: str) -> tuple[float | None, float | None, int, int]:
    """(min, max) of the finite values of `expr` over relation `src`, rows, and rows without one."""
    lo, hi, n, bad = con.execute(
        f"SELECT min(v) FILTER (isfinite(v)), max(v) FILTER (isfinite(v)), count(*), "
        f"count(*) FILTER (v IS NULL OR NOT isfinite(v)) FROM (SELECT ({expr})::DOUBLE AS v FROM {src})").fetchone()
    return lo, hi, int(n), int(bad)


def edges_for(lo: float, hi: float, bins: int, include: list[float] = ()) -> np.ndarray:
    """`bins` equal bins spanning [lo, hi] widened to contain every value of `include`."""
    lo, hi = min([lo, *include]), max([hi, *include])
    if hi <= lo:
        hi = lo + 1.0
    return np.linspace(lo, hi, bins + 1)


def counts(con: duckdb.DuckDBPyConnection, src: str, expr: str, edges: np.ndarray) -> np.ndarray:
    """Rows of relation `src` per bin (edges[i], edges[i+1]] (the first bin also takes edges[0]);
    values outside the edges are clipped into the end bins."""
    bounds = "[" + ", ".join(repr(float(e)) for e in edges[1:]) + "]::DOUBLE[]"
    # Clip after dropping null/NaN/inf: duckdb's greatest() skips a NULL argument (NULL -> edges[0]).
    clipped = f"least(greatest(v, {float(edges[0])!r}), {float(edges[-1])!r})"
    (hist,) = con.execute(f"SELECT histogram({clipped}, {bounds}) FROM (SELECT ({expr})::DOUBLE AS v FROM {src}) "
                          "WHERE isfinite(v)").fetchone()
    out = np.zeros(len(edges) - 1, dtype=np.int64)
    index = {float(e): i for i, e in enumerate(edges[1:])}
    for bound, n in (hist or {}).items():
        if float(bound) in index:
            out[index[float(bound)]] = n
    return out


def histogram(con: duckdb.DuckDBPyConnection, sides: dict[str, str], expr: str, bins: int,
              include: list[float] = ()) -> Histogram | None:
    """One histogram of `expr` per side (name -> relation), on bins fitted to the first side's
    range; None when the first side has no finite value."""
    ranges = {side: value_range(con, src, expr) for side, src in sides.items()}
    lo, hi, _, _ = next(iter(ranges.values()))
    if lo is None:
        return None
    edges = edges_for(lo, hi, bins, list(include))
    return Histogram(edges, {side: counts(con, src, expr, edges) for side, src in sides.items()},
                     {side: r[2] for side, r in ranges.items()}, {side: r[3] for side, r in ranges.items()})


def grouped(con: duckdb.DuckDBPyConnection, sql: str) -> list[tuple]:
    return con.execute(sql).fetchall()
