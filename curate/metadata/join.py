"""`curate join`: merge any per-row table into the metadata by key, e.g. LAION's aesthetic
scores (`laion2B-en-aesthetic-tags`: hash, aesthetic) or a punsafe / pwatermark table.

A partitioned join (curate.metadata.partjoin): both sides hash-partitioned by key, so memory
per task stays bounded for a table of billions of rows. Rules (also in docs/curate-metadata.md):
  * keys match exactly, as integers when either side's key column is an integer type (text
    that is not an integer is no key), else as text; `on: hash` computes LAION's hash for a
    metadata file that has none;
  * a table row without a key is not used (counted as `table_unusable`);
  * several table rows with one key (`duplicates`): `first` merges the first by (table file
    path, row) and ledgers the metadata row `kept`, reason `ambiguous`, value = the number of
    candidates; `error` stops the partition's task with the key, before it writes anything;
  * a metadata row whose key is in no table row (`missing`): `keep` (merged columns null;
    ledger `kept`, reason `unmatched`) or `drop` (ledger `filtered`, reason `unmatched`);
  * a merged column the metadata already has (`on_clash`): `error` (refused before anything
    runs), `replace` (the table's value where the row matched, else the metadata's) or `keep`
    (the metadata's value unless it is null).
Output: OUT/part-<p>.parquet per partition, rows in (source file, row) order; every input row
is in the ledger (kept / filtered / failed, see partjoin).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from core import storage
from core.config import execution
from curate.metadata import exec as mx
from curate.metadata import io as mio
from curate.metadata import partjoin
from curate.steps import Step

DUPLICATE_RULES = ("first", "error")


@dataclass
class JoinConfig:
    table: str = ""  # the table to merge in: a parquet file, folder, glob or s3:// / gs:// URI (required)
    on: str = "hash"  # the metadata's key column (hash: LAION's, computed where a file has none)
    table_key: str = ""  # the table's key column; "" = the same name as `on`
    columns: list = field(default_factory=list)  # the table's columns to merge in; [] = all but its key
    duplicates: str = "first"  # a key on several table rows: first (first by table file, row) | error
    missing: str = "keep"  # a row whose key is in no table row: keep (merged columns null) | drop
    on_clash: str = "error"  # a merged column the metadata has too: error | replace | keep (see the module doc)
    partitions: int = 0  # hash partitions; 0 = ceil((rows + table rows) / rows_per_partition)
    rows_per_partition: int = 2_000_000  # sizes partitions when `partitions` is 0 (one task joins one)
    threads: int = execution(1)  # duckdb threads and Ray CPUs per task
    memory: str = execution("1GB")  # duckdb memory limit per task (spills beyond it)
    allow_incomplete: bool = execution(False)  # read an unfinished upstream step's folder as it is

    def __post_init__(self) -> None:
        if not self.table:
            raise ValueError("table: the path of the table to merge in is required (--table)")
        if not self.on:
            raise ValueError("on: the key column is required")
        if self.duplicates not in DUPLICATE_RULES:
            raise ValueError(f"duplicates must be one of {', '.join(DUPLICATE_RULES)}, got {self.duplicates!r}")
        if self.missing not in partjoin.MISSING_RULES:
            raise ValueError(f"missing must be one of {', '.join(partjoin.MISSING_RULES)}, got {self.missing!r}")
        if self.on_clash not in ("error", *partjoin.CLASH_RULES):
            raise ValueError(f"on_clash must be one of error, {', '.join(partjoin.CLASH_RULES)}, got {self.on_clash!r}")
        if not isinstance(self.columns, list) or not all(isinstance(c, str) for c in self.columns):
            raise ValueError(f"columns must be a list of column names, got {self.columns!r}")
        if self.partitions < 0 or self.rows_per_partition < 1 or self.threads < 1:
            raise ValueError("partitions must be >= 0, rows_per_partition and threads >= 1")

    @property
    def key(self) -> str:
        return self.table_key or self.on


def table_rows(key: str, values: tuple[str, ...], norm: str, con: Any, f: mio.InputFile, j: int, safe: bool) -> partjoin.TableRows:
    """One table file's rows: the normalised key, the merged columns (NULL where this file lacks
    one), and (file, row) for `duplicates: first`."""
    scan = mio.Scan(f, con, columns=[c for c in (f.column(key), *map(f.stored, values)) if c], safe=safe)
    have = mio.file_columns(f)
    cols = ", ".join(mio.ident(v) if v.lower() in have else f"NULL AS {mio.ident(v)}" for v in values)
    sql = (f"SELECT {norm.format(mio.ident(f.column(key)))} AS _jk, {cols}, {j}::INTEGER AS _tsrc, "
           f"file_row_number AS _trow FROM {scan()}")
    return partjoin.TableRows(sql)


def key_norm(meta: list[mio.InputFile], on: str, tables: list[mio.InputFile], key: str) -> tuple[str, str]:
    """(SQL normalising a key `{}`, its type): integers if either side stores integers."""
    types = [f.type_of(on) for f in meta if f.column(on)] + [f.type_of(key) for f in tables]
    if on.lower() == "hash" and any(f.column("hash") is None for f in meta):
        types.append(pa.int64())  # computed
    if any(t is not None and pa.types.is_uint64(t) for t in types):
        # LAION's hash is mmh3's signed 64-bit value; `mmh3.hash64(..., signed=False)` (or a
        # writer that stored it unsigned) keeps the same bits as uint64. Read such keys as the
        # signed integer of the same bits, or half the keys (those >= 2**63) would not fit BIGINT.
        wide = "TRY_CAST({0} AS HUGEINT)"
        return (f"TRY_CAST((CASE WHEN {wide} >= {2**63} THEN {wide} - {2**64} ELSE {wide} END) AS BIGINT)",
                "BIGINT")
    if any(t is not None and pa.types.is_integer(t) for t in types):
        return "TRY_CAST({} AS BIGINT)", "BIGINT"
    return "{}::VARCHAR", "VARCHAR"


def _values(cfg: JoinConfig, tables: list[mio.InputFile], con: Any) -> list[tuple[str, str]]:
    """The merged columns (name, common type): `columns`, or every table column but the key."""
    names = cfg.columns or [c for c in tables[0].columns if c.lower() != cfg.key.lower()]
    # A table's AESTHETIC_SCORE is read as `aesthetic`, as on the metadata side (unified_columns).
    names = [_renamed(n, tables[0]) for n in names]
    for f in tables:
        mio.require(f, [cfg.key, *names])
    types = dict((n.lower(), t) for n, t in mio.unified_columns(tables, con))
    return [(n, types[n.lower()]) for n in names]


def _renamed(name: str, f: mio.InputFile) -> str:
    if f.aesthetic and name.lower() == f.aesthetic.lower() and f.column("aesthetic") is None:
        return "aesthetic"
    return name


def _clashes(cfg: JoinConfig, meta_columns: list[tuple[str, str]], values: list[tuple[str, str]],
             files: list[mio.InputFile], tables: list[mio.InputFile]) -> list[tuple[str, str]]:
    """(column, rule) for each merged column the metadata has too; `on_clash: error` refuses."""
    have = {n.lower() for n, _ in meta_columns}
    clash = [n for n, _ in values if n.lower() in have]
    if clash and cfg.on_clash == "error":
        raise mio.MetadataError(
            f"the table ({tables[0].path}) and the metadata ({files[0].path}) both have column {clash[0]!r}; "
            "set on_clash: replace (the table's value where a row matches) or keep (the metadata's value "
            "unless it is null), or pick the table's columns with `columns`")
    return [(n, cfg.on_clash) for n in clash]


def run(cfg: JoinConfig, inp: str, out: str) -> dict[str, Any]:
    """Merge the table `cfg.table` into every parquet file of `inp`, written to `out`; returns the stats."""
    files = mio.load_inputs(inp, [] if cfg.on.lower() == "hash" else [cfg.on], cfg.allow_incomplete)
    tables = mio.load_inputs(cfg.table, [cfg.key])
    con = mio.connect()
    meta_columns = mio.unified_columns(files, con)
    if "hash" not in {c.lower() for c, _ in meta_columns} and cfg.on.lower() == "hash":
        meta_columns.append(("hash", "BIGINT"))  # computed for files that lack it (LAION's definition)
    values = _values(cfg, tables, con)
    norm, key_type = key_norm(files, cfg.on, tables, cfg.key)
    rows = sum(f.rows for f in files) + sum(f.rows for f in tables)
    parts = partjoin.partitions(rows, cfg.rows_per_partition, cfg.partitions)
    merge = partjoin.Merge(
        step="join", key_norm=norm, key_type=key_type, meta_key=cfg.on,
        table_rows=functools.partial(table_rows, cfg.key, tuple(n for n, _ in values), norm),
        values=tuple(values), meta_columns=tuple(meta_columns),
        clash=tuple(_clashes(cfg, meta_columns, values, files, tables)),
        order="_tsrc, _trow", distinct="*", missing=cfg.missing, threads=cfg.threads, memory=cfg.memory,
        strict=cfg.duplicates == "error")
    out_path = storage.path(out)
    rd = mx.open_run(out_path, "join", cfg, inp, files, (str(cfg.table),), table=mio.fingerprint(tables), partitions=parts)
    tmaps, infos = partjoin.run(rd, merge, files, tables, parts, "join")
    t = partjoin.totals(tmaps, "rows", "used")
    j = partjoin.totals(infos, "matched", "ambiguous", "table_keys", "table_duplicate_keys")
    n = sum(f.rows for f in files)
    return mx.finish(out_path, "join", files, infos, matched=j["matched"], match_rate=round(j["matched"] / n, 6) if n else 0.0,
                     ambiguous=j["ambiguous"], table_rows=t["rows"], table_unusable=t["rows"] - t["used"],
                     table_keys=j["table_keys"], table_duplicate_keys=j["table_duplicate_keys"], partitions=parts,
                     table=str(cfg.table))


STEP = Step("join", JoinConfig, run)
