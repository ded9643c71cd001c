"""The partitioned join: a per-row table merged into metadata by key, hash-partitioned on both
sides so that every task's memory is bounded, whatever the size of either side (a table of
billions of rows included). `curate join` and `curate captions` are both this join.

Phases (Ray tasks through core.units; data handed over as bundles, curate.metadata.shuffle):
  t  one task per table file: its usable rows (`Merge.table_rows`: the normalised key `_jk`,
     the merged columns, the row's (file, row) for a deterministic choice among duplicates) to
     the blob of partition hash(_jk) % P of one bundle;
  m  one task per metadata file: every row, whole (projected onto the inputs' common columns),
     with its normalised key and row index, to its partition's blob, in row order (rows
     without a key are spread by row index);
  j  one task per partition: the table's rows of the partition, one per key (the first by
     `Merge.order`; how many candidates there were is kept), left-joined with the metadata
     rows of the partition; writes OUT/part-<p>.parquet (rows in source file, then row order)
     and the ledger of every metadata row of the partition.
Every metadata row is in exactly one partition, so rows in = rows out (+ drops, ledgered).
Memory per task: one blob at a time streamed in, and one partition's table rows held by duckdb
(spilled past its limit). P is fixed by the inputs (see `partitions`), never by the workers.

Rules, the same for every join:
  * a metadata row whose key has no table row (or no key): `kept` with reason `unmatched` and
    the merged columns null, or, with missing=drop, `filtered` with reason `unmatched`;
  * a key on several table rows: the first by `Merge.order` is merged; the row is `kept` with
    reason `ambiguous` and the number of candidates as `value`; the stats count such keys;
  * a merged column the metadata already has: `replace` (the table's value where the row
    matched, else the metadata's own) or `keep` (the metadata's value unless it is null);
  * a metadata row whose URL or TEXT is not valid UTF-8: `failed` (duckdb cannot carry it).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from core.storage import AnyPath
from core.units import Resources, Unit, run_units, unfinished
from core import storage
from curate.metadata import exec as mx
from curate.metadata import io as mio
from curate.metadata import shuffle
from core.rundir import RunDir

CLASH_RULES = ("replace", "keep")
MISSING_RULES = ("keep", "drop")
UNMATCHED, AMBIGUOUS = "unmatched", "ambiguous"


@dataclass(frozen=True)
class TableRows:
    """One table file's usable rows as a duckdb relation (columns `_jk`, the merged columns,
    `_tsrc`, `_trow`) and, once it has been read, counts of what was left out."""

    sql: str
    dropped: Callable[[], dict[str, int]] = dict


@dataclass(frozen=True)
class Merge:
    """What a partitioned join merges in and how (built by the step's driver, sent to tasks)."""

    step: str  # the step's name, as its ledger says
    key_norm: str  # SQL normalising a key expression `{}` alike on both sides (NULL = no key)
    key_type: str  # duckdb type of the normalised key
    meta_key: str  # the metadata's key column (`hash`: LAION's, computed where a file lacks it)
    table_rows: Callable[..., TableRows]  # (con, f, j, safe) -> one table file's usable rows
    values: tuple[tuple[str, str], ...]  # merged columns (name, duckdb type)
    meta_columns: tuple[tuple[str, str], ...]  # the metadata's common columns (name, duckdb type)
    clash: tuple[tuple[str, str], ...]  # (merged column the metadata has too, CLASH_RULES entry)
    order: str  # SQL ORDER BY among one key's table rows: the first is merged
    distinct: str  # SQL of what tells candidates apart ("*": every row is a candidate)
    missing: str = "keep"  # MISSING_RULES: a metadata row without a table row is kept or dropped
    strict: bool = False  # a key on several table rows is an error (the task stops before writing)
    threads: int = 1  # duckdb threads per task
    memory: str = "1GB"  # duckdb memory limit per task

    @property
    def outputs(self) -> list[tuple[str, str]]:
        """The output columns: the metadata's (a clashing one typed for both), then the new ones."""
        clashing = {name.lower() for name, _ in self.clash}
        types = {n.lower(): t for n, t in self.values}
        meta = [(n, _common(t, types[n.lower()]) if n.lower() in clashing else t) for n, t in self.meta_columns]
        return meta + [(n, t) for n, t in self.values if n.lower() not in clashing]


def _common(a: str, b: str) -> str:
    """duckdb's common supertype of two types."""
    import duckdb

    return a if a == b else str(duckdb.sql(f"SELECT NULL::{a} AS x UNION ALL SELECT NULL::{b}").types[0])


def partitions(rows: int, rows_per_partition: int, fixed: int = 0) -> int:
    """P: `fixed`, else ceil(rows of both sides / rows_per_partition)."""
    return fixed or max(1, math.ceil(rows / rows_per_partition))


def ledger_reasons() -> list[str]:
    return ["invalid UTF-8 in URL", "invalid UTF-8 in TEXT", UNMATCHED, AMBIGUOUS]


# ---------------------------------------------------------------- map tasks


def _map_table(f: mio.InputFile, j: int, merge: Merge, parts: int, out: AnyPath) -> dict[str, Any]:
    """Phase t: table file j's usable rows to their partitions' blobs."""
    attempt = mx.attempt()

    def body(safe: bool) -> dict[str, Any]:
        with mio.task_connection(merge.threads, merge.memory) as con:
            rows = merge.table_rows(con, f, j, safe)
            dest = mx.output(out, f"_work/t-{j:05d}.bundle", attempt)
            select = f"SELECT *, (hash(_jk) % {parts})::INTEGER AS _jp FROM ({rows.sql}) WHERE _jk IS NOT NULL"
            index = shuffle.write(con, select, "_jp", dest)
        return {"rows": f.rows, "used": sum(index["rows"]), **rows.dropped(), "bundle": index, "files": [mx.rel(out, dest)]}

    return mio.safe_retry(body)


def _map_meta(f: mio.InputFile, i: int, merge: Merge, parts: int, out: AnyPath) -> dict[str, Any]:
    """Phase m: metadata file i's rows, whole, to their partitions' blobs, in row order."""
    attempt = mx.attempt()

    def body(safe: bool) -> dict[str, Any]:
        with mio.task_connection(merge.threads, merge.memory) as con:
            hashed = merge.meta_key == "hash" or "hash" in {n.lower() for n, _ in merge.meta_columns}
            scan = mio.Scan(f, con, with_hash=hashed, safe=safe)
            have = mio.file_columns(f) | ({"hash"} if hashed else set())
            col = f.column(merge.meta_key) or ("hash" if merge.meta_key == "hash" else None)
            key = merge.key_norm.format(mio.ident(col)) if col else "NULL"
            select = (f"SELECT *, (CASE WHEN _jk IS NULL THEN hash(_jrow) ELSE hash(_jk) END % {parts})::INTEGER AS _jp "
                      f"FROM (SELECT {mio.project_sql(have, list(merge.meta_columns))}, {key} AS _jk, "
                      f"file_row_number AS _jrow, _invalid AS _jfail FROM {scan()})")
            dest = mx.output(out, f"_work/m-{i:05d}.bundle", attempt)
            index = shuffle.write(con, select, "_jp", dest, order="_jrow")
        info = {"rows": f.rows, "bundle": index, "files": [mx.rel(out, dest)]}
        return {**info, "repaired_utf8": scan.repaired} if scan.repaired else info

    return mio.safe_retry(body)


# ---------------------------------------------------------------- the join of one partition


def _empty(con: Any, columns: Sequence[tuple[str, str]]) -> str:
    return "(SELECT " + ", ".join(f"NULL::{t} AS {mio.ident(n)}" for n, t in columns) + " LIMIT 0)"


def _resolve(con: Any, merge: Merge, pieces: shuffle.Pieces) -> None:
    """Temp table `t`: one table row per key of the partition (the first by merge.order) and
    `_jn`, how many different candidates the key had."""
    stream = shuffle.stream(pieces)
    cols = ", ".join(mio.ident(n) for n, _ in merge.values)
    if stream is None:
        con.execute(f"CREATE TEMP TABLE t AS SELECT NULL::{merge.key_type} AS _jk, {cols}, 0::BIGINT AS _jn FROM "
                    f"{_empty(con, merge.values)}")
        return
    con.register("table_in", stream)
    distinct = "*" if merge.distinct == "*" else f"DISTINCT {merge.distinct}"
    con.execute(f"CREATE TEMP TABLE t AS SELECT _jk, {cols}, count({distinct}) OVER k AS _jn FROM table_in "
                f"WINDOW k AS (PARTITION BY _jk) QUALIFY row_number() OVER (PARTITION BY _jk ORDER BY {merge.order}) = 1")
    con.unregister("table_in")


def _refuse_duplicates(con: Any, p: int) -> None:
    row = con.execute("SELECT _jk, _jn FROM t WHERE _jn > 1 ORDER BY _jk LIMIT 1").fetchone()
    if row is not None:
        n = con.execute("SELECT count(*) FROM t WHERE _jn > 1").fetchone()[0]
        raise mio.MetadataError(f"partition {p}: the table has {n} keys on several rows (e.g. {row[0]!r} on {row[1]} "
                                "rows) and duplicates is `error`; set duplicates: first to merge the first row by "
                                "(table file, row), in a new output folder")


def _output_sql(merge: Merge) -> str:
    """The SELECT list of the joined rows: metadata columns `m`, merged ones `v` (the table's
    values per metadata row), clashes by rule."""
    rules = {n.lower(): how for n, how in merge.clash}
    exprs = []
    for name, typ in merge.outputs:
        m, t = f"m.{mio.ident(name)}", f"v.{mio.ident(name)}"
        how = rules.get(name.lower())
        if how == "replace":
            e = f"CASE WHEN v._jmatched THEN {t}::{typ} ELSE {m}::{typ} END"
        elif how == "keep":
            e = f"coalesce({m}::{typ}, {t}::{typ})"
        elif any(name.lower() == v.lower() for v, _ in merge.values):
            e = f"{t}::{typ}"
        else:
            e = m
        exprs.append(f"{e} AS {mio.ident(name)}")
    return ", ".join(exprs)


def _join(tpieces: shuffle.Pieces, mpieces: shuffle.Pieces, merge: Merge, sources: list[str], out: AnyPath) -> dict[str, Any]:
    """Phase j: partition p's table rows (one per key) left-joined with its metadata rows ->
    OUT/part-<p>.parquet and OUT/_ledger/part-<p>.parquet."""
    p, attempt = mpieces.part, mx.attempt()
    part, led = mx.output(out, f"part-{p:05d}.parquet", attempt), mx.ledger_path(out, f"part-{p:05d}", attempt)
    outputs = merge.outputs
    with mio.task_connection(merge.threads, merge.memory) as con:
        _resolve(con, merge, tpieces)
        if merge.strict:
            _refuse_duplicates(con, p)
        stream = shuffle.stream(mpieces, source="_jsrc")
        meta = _empty(con, [*merge.meta_columns, ("_jk", merge.key_type), ("_jrow", "BIGINT"), ("_jfail", "VARCHAR"),
                            ("_jsrc", "INTEGER")])
        if stream is not None:
            con.register("meta_in", stream)
            meta = "meta_in"
        # The metadata rows arrive in (source file, row) order; kept so in `m`. The join itself
        # is narrow (each row's position and the table's values), sorted back by position and
        # put beside `m` by a positional join: the output needs no wide sort, whatever the
        # join plan or the threads (a wide ORDER BY cost ~0.45 CPU s per 1.5M rows).
        con.execute(f"CREATE TEMP TABLE m AS SELECT * FROM {meta}")
        if stream is not None:
            con.unregister("meta_in")
        values = ", ".join(f"t.{mio.ident(n)}" for n, _ in merge.values)
        con.execute(f"CREATE TEMP TABLE v AS SELECT m.rowid AS _pos, t._jk IS NOT NULL AS _jmatched, t._jn, {values} "
                    f"FROM m LEFT JOIN t ON m._jk = t._jk ORDER BY _pos")
        joined = f"(SELECT {_output_sql(merge)}, m._jsrc, m._jrow, m._jfail, v._jmatched, v._jn FROM m POSITIONAL JOIN v)"
        names = ", ".join(mio.ident(n) for n, _ in outputs)
        keep = "_jfail IS NULL" + (" AND _jmatched" if merge.missing == "drop" else "")
        mx.copy_to(con, f"SELECT {names} FROM {joined} WHERE {keep}", part)
        mx.write_ledger(con, f"SELECT {_ledger_select(merge, outputs, sources)} FROM {joined}", led)
        matched, ambiguous, failed, keys, multi = con.execute(
            f"SELECT count(*) FILTER (WHERE _jmatched AND _jfail IS NULL), "
            f"count(*) FILTER (WHERE _jmatched AND _jn > 1 AND _jfail IS NULL), count(*) FILTER (WHERE _jfail IS NOT NULL), "
            f"(SELECT count(*) FROM t), (SELECT count(*) FILTER (WHERE _jn > 1) FROM t) FROM {joined}").fetchone()
    return {"rows": mpieces.rows, "matched": int(matched), "ambiguous": int(ambiguous), "failed": int(failed),
            "table_keys": int(keys), "table_duplicate_keys": int(multi), "files": [mx.rel(out, part), mx.rel(out, led)]}


def _ledger_select(merge: Merge, outputs: list[tuple[str, str]], sources: list[str]) -> str:
    types = {n.lower(): (n, t) for n, t in outputs}
    name, key_type = types.get("hash") or types.get("url") or ("NULL", "VARCHAR")
    key = "NULL" if name == "NULL" else mio.ident(name)
    drop = merge.missing == "drop"
    state = (f"CASE WHEN _jfail IS NOT NULL THEN 'failed' "
             f"WHEN NOT _jmatched THEN '{'filtered' if drop else 'kept'}' ELSE 'kept' END")
    reason = (f"coalesce(_jfail, CASE WHEN NOT _jmatched THEN '{UNMATCHED}' "
              f"WHEN _jn > 1 THEN '{AMBIGUOUS}' END)")
    value = "CASE WHEN _jfail IS NULL AND _jmatched AND _jn > 1 THEN _jn::VARCHAR END"
    return mx.ledger_select(merge.step, f"{mio.sql_list(sources)}[_jsrc + 1]", "_jrow", key, state, reason,
                            value, key_type=key_type, sources=sources, reasons=ledger_reasons())


# ---------------------------------------------------------------- the driver


def run(rd: RunDir, merge: Merge, files: list[mio.InputFile], tables: list[mio.InputFile], parts: int,
        label: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Run the three phases into `rd`; returns (the table maps' infos, the partitions' infos).
    `_work` (the bundles) is removed once every partition is written."""
    out, res = rd.path, Resources(cpus=merge.threads)
    known: dict[str, dict | None] = {}  # the partitions' markers, read once
    redo = bool(unfinished(rd, [f"part-{p:05d}" for p in range(parts)], known))  # then the maps' bundles are needed
    tmaps = run_units(rd, [Unit(f"t-{j:05d}", (f, j, merge, parts, out)) for j, f in enumerate(tables)],
                      _map_table, f"{label}: partition the table", res, transient=redo)
    mmaps = run_units(rd, [Unit(f"m-{i:05d}", (f, i, merge, parts, out)) for i, f in enumerate(files)],
                      _map_meta, f"{label}: partition the rows", res, transient=redo)
    tplan = shuffle.plan(out / "_work", [x["bundle"] for x in tmaps], parts)
    mplan = shuffle.plan(out / "_work", [x["bundle"] for x in mmaps], parts)
    sources = [f.path for f in files]
    units = [Unit(f"part-{p:05d}", (tplan[p], mplan[p], merge, sources, out), input=tplan[p].digest() + mplan[p].digest())
             for p in range(parts)]
    infos = run_units(rd, units, _join, f"{label}: join", res, known=known)
    storage.rmtree(out / "_work")
    return tmaps, infos


def totals(infos: Sequence[dict[str, Any]], *keys: str) -> dict[str, int]:
    return {k: sum(int(i.get(k, 0)) for i in infos) for k in keys}
