"""The ledger: every input row of every step ends in exactly one recorded state.

Stored as parquet under `OUT/_ledger/` (one file per task). Columns (LEDGER_SCHEMA):
    step    str   the step that decided ("dedup", "filter", "download", ...)
    source  str   the input file or shard the row came from
    row     int64 the row's index in `source` (with `source`, a unique row id)
    key     str   the row's own id for people (LAION `hash`, a sample key, a URL); the
                  metadata steps write LAION's `hash` with its input type (int64), one type
                  per step, since text costs them a third of a ledger's write time
    state   str   one of STATES
    reason  str?  filtered: filter name ("aesthetic", "missing:pwatermark");
                  failed: error class/message; duplicate: the dedup key kind
    value   str?  filtered: the offending value; failed: detail
    ref     str?  duplicate: the kept row's key (same type as `key`)
Counts reconcile: rows in = kept + filtered + duplicate + failed, checked before a step ends.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import duckdb
import pyarrow as pa
from rich.console import Console
from rich.table import Table

from core import atomic, storage
from core.storage import AnyPath

STATES = ("kept", "filtered", "duplicate", "failed")

LEDGER_SCHEMA = pa.schema(
    [
        ("step", pa.string()),
        ("source", pa.string()),
        ("row", pa.int64()),
        ("key", pa.string()),
        ("state", pa.string()),
        ("reason", pa.string()),
        ("value", pa.string()),
        ("ref", pa.string()),
    ]
)

LEDGER_DIR = "_ledger"


class LedgerMismatchError(RuntimeError):
    """Rows were lost or doubled: in != kept + filtered + duplicate + failed."""


def conform(table: pa.Table) -> pa.Table:
    """Cast `table` to LEDGER_SCHEMA (missing optional columns become null) and check states."""
    cols = {}
    for field in LEDGER_SCHEMA:
        if field.name in table.column_names:
            cols[field.name] = table.column(field.name).cast(field.type)
        elif field.name in ("reason", "value", "ref", "key"):
            cols[field.name] = pa.nulls(table.num_rows, field.type)
        else:
            raise ValueError(f"ledger table lacks required column {field.name!r}")
    out = pa.table(cols, schema=LEDGER_SCHEMA)
    bad = set(out.column("state").unique().to_pylist()) - set(STATES)
    if bad:
        raise ValueError(f"ledger states must be one of {STATES}, got {sorted(map(str, bad))}")
    return out


def rows(step: str, source: str, records: list[Mapping[str, Any]]) -> pa.Table:
    """Build a ledger table from dicts with keys row, key, state and optional reason/value/ref."""
    cols: dict[str, list] = {f.name: [] for f in LEDGER_SCHEMA}
    for rec in records:
        cols["step"].append(step)
        cols["source"].append(source)
        for name in ("row", "key", "state", "reason", "value", "ref"):
            v = rec.get(name)
            cols[name].append(None if v is None else (v if name == "row" else str(v)))
    return conform(pa.table(cols, schema=LEDGER_SCHEMA))


def write(out: str | os.PathLike, task: str, table: pa.Table) -> AnyPath:
    """Write one task's ledger part atomically to OUT/_ledger/<task>.parquet."""
    path = storage.path(out) / LEDGER_DIR / f"{task}.parquet"
    atomic.write_parquet(path, conform(table))
    return path


def parts(out: str | os.PathLike) -> list[AnyPath]:
    """The ledger parts of a step's output folder (every unit names its part after itself)."""
    return sorted((p for p in (storage.path(out) / LEDGER_DIR).glob("*.parquet") if not p.name.startswith("_")),
                  key=str)


def counts(out: str | os.PathLike, files: Sequence[AnyPath] | None = None) -> dict[str, int]:
    """State counts over the ledger parts `files` (default: every part in OUT/_ledger)."""
    result = {s: 0 for s in STATES}
    result.update(grouped(parts(out) if files is None else files, "state"))
    return result


def grouped(files: Sequence[AnyPath], by: str, where: str = "") -> dict[str, int]:
    """Row counts of ledger parts `files` per value of column `by` (SQL `where`, optional):
    duckdb over local files, a pyarrow dataset registered on duckdb for object-store ones."""
    if not files:
        return {}
    con = duckdb.connect()
    try:
        if storage.is_remote(files[0]):
            import pyarrow.dataset as ds

            fs, _ = storage.arrow_fs(files[0])
            con.register("ledger_parts", ds.dataset([storage.path(f).key for f in files], filesystem=fs, format="parquet"))
            relation = "ledger_parts"
        else:
            relation = "read_parquet([" + ", ".join("'" + str(f).replace("'", "''") + "'" for f in files) + "])"
        rows = con.execute(f"SELECT {by}, count(*) FROM {relation} {('WHERE ' + where) if where else ''} "
                           f"GROUP BY 1 ORDER BY 1").fetchall()
    finally:
        con.close()
    return {k: int(n) for k, n in rows}


def reconcile(n_in: int, state_counts: Mapping[str, int], step: str = "") -> None:
    total = sum(state_counts.get(s, 0) for s in STATES)
    if total != n_in:
        raise LedgerMismatchError(
            f"{step}: {n_in} rows in but the ledger accounts for {total} "
            f"({', '.join(f'{s}={state_counts.get(s, 0)}' for s in STATES)})"
        )


def write_stats(
    out: str | os.PathLike, step: str, n_in: int, state_counts: Mapping[str, int], **extra: Any
) -> dict[str, Any]:
    """Reconcile, then write OUT/_stats.json; returns what it wrote."""
    reconcile(n_in, state_counts, step)
    stats = {"step": step, "rows_in": n_in, **{s: int(state_counts.get(s, 0)) for s in STATES}}
    stats.update(extra)
    atomic.write_json(storage.path(out) / "_stats.json", stats)
    return stats


def print_counts(stats: Mapping[str, Any], console: Console | None = None) -> None:
    """The counts as a table: rows in, then each state with its share."""
    console = console or Console()
    n_in = int(stats.get("rows_in", 0))
    table = Table(title=f"{stats.get('step', '')}: {n_in:,} rows in")
    table.add_column("state")
    table.add_column("rows", justify="right")
    table.add_column("share", justify="right")
    for s in STATES:
        n = int(stats.get(s, 0))
        table.add_row(s, f"{n:,}", f"{(100.0 * n / n_in if n_in else 0):.2f}%")
    console.print(table)
