"""Ledger of a download: every input row ends `kept` or `failed`, exactly once.

Each *original* shard S (rows [start, stop) of one input file) owns one ledger part,
`OUT/_ledger/NNNNN.parquet`. A row's final outcome is the one from the latest shard that
processed it: S itself, overridden by any finished retry shard that re-queued the row
(retry shards carry `source_shard`). Parts are rebuilt from the shard parquets, atomically,
whenever S or one of its retry shards finishes, so a killed run never doubles a row.
"""
from __future__ import annotations

from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.dataset as ds

from core import ledger, storage
from core.storage import AnyPath
from curate.download.errors import classify
from curate.download.plan import ShardEntry

STEP = "download"
_OUTCOME_COLUMNS = ["source_row", "source_shard", "key", "status", "error_message"]


def outcomes(parquet: AnyPath, shard_id: int | None = None) -> dict[int, tuple[str, str, str | None]]:
    """source_row -> (key, status, error_message) of one shard parquet (rows of `shard_id` only;
    one shard's rows: a bounded dict)."""
    t = storage.read_parquet(parquet, columns=_OUTCOME_COLUMNS)
    cols = [t.column(c).to_pylist() for c in _OUTCOME_COLUMNS]
    return {r: (k, s, e) for r, src, k, s, e in zip(*cols) if shard_id is None or src == shard_id}


def record(row: int, key: str, status: str, message: str | None) -> dict[str, Any]:
    """One ledger record: kept, or failed with the category as reason and img2dataset's words."""
    if status == "success":
        return {"row": row, "key": key, "state": "kept"}
    return {"row": row, "key": key, "state": "failed", "reason": classify(status, message), "value": f"{status}: {message}"}


def build_part(entry: ShardEntry, own: AnyPath, retries: list[AnyPath]) -> pa.Table:
    """Ledger part of original shard `entry` from its parquet `own` and its retry parquets
    (in shard order; later wins). Raises if a planned row is missing or an extra one appears."""
    final = outcomes(own)
    for path in retries:
        final.update(outcomes(path, entry.id))
    expected = range(entry.start, entry.stop)
    if len(final) != len(expected) or set(final) != set(expected):
        raise ledger.LedgerMismatchError(f"shard {entry.id}: outcomes do not match rows {expected}")
    return ledger.rows(STEP, entry.source or "", [record(r, *final[r]) for r in expected])


def failed_reasons(out: AnyPath) -> dict[str, int]:
    """reason -> count over every failed row (for _stats.json and the summary)."""
    parts = ledger.parts(out)
    if not parts:
        return {}
    fs, _ = storage.arrow_fs(parts[0])
    dataset = ds.dataset([storage.arrow_fs(p)[1] for p in parts], filesystem=fs, format="parquet")
    with duckdb.connect() as con:
        con.register("ledger_parts", dataset)
        rows = con.execute("SELECT reason, count(*) FROM ledger_parts WHERE state = 'failed' GROUP BY 1 ORDER BY 2 DESC, 1")
        return {r: int(n) for r, n in rows.fetchall()}
