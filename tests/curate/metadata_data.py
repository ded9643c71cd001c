"""Small hand-made LAION-style tables for the metadata step tests, and readers of step outputs."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import duckdb
import mmh3
import pyarrow as pa
import pyarrow.parquet as pq

SCHEMA = pa.schema([
    ("URL", pa.string()), ("TEXT", pa.string()), ("WIDTH", pa.float64()), ("HEIGHT", pa.float64()),
    ("similarity", pa.float64()), ("hash", pa.int64()), ("punsafe", pa.float32()),
    ("pwatermark", pa.float32()), ("aesthetic", pa.float32()),
])


def row(url: str | None, text: str | None = "a photo", aesthetic: float | None = 5.0,
        similarity: float | None = 0.3, pwatermark: float | None = 0.1, punsafe: float | None = 0.01,
        width: float = 512.0, height: float = 512.0, **extra: Any) -> dict[str, Any]:
    """One LAION row; `hash` is LAION's mmh3 of URL+TEXT unless given."""
    h = extra.pop("hash", mmh3.hash64((url or "") + (text or ""))[0])
    return dict(URL=url, TEXT=text, WIDTH=width, HEIGHT=height, similarity=similarity, hash=h,
                punsafe=punsafe, pwatermark=pwatermark, aesthetic=aesthetic, **extra)


def write(path: Path, rows: list[dict[str, Any]], schema: pa.Schema | None = SCHEMA) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pylist(rows, schema=schema) if schema is not None else pa.Table.from_pylist(rows)
    pq.write_table(table, path)
    return path


def read_out(folder: Path) -> list[dict[str, Any]]:
    """Kept rows of a step output (top-level parquet), in file then row order."""
    files = sorted(Path(folder).glob("*.parquet"))
    return [r for f in files for r in pq.read_table(f).to_pylist()]


def read_ledger(folder: Path) -> list[dict[str, Any]]:
    rows = duckdb.sql(f"SELECT * FROM read_parquet('{folder}/_ledger/*.parquet') ORDER BY source, row").fetchall()
    cols = ["step", "source", "row", "key", "state", "reason", "value", "ref"]
    return [dict(zip(cols, r)) for r in rows]


def nan_to_none(x: float | None) -> float | None:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else x
