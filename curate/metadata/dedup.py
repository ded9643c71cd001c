"""`curate dedup`: exact deduplication of LAION-style metadata, globally correct on Ray.

Three phases of Ray tasks, all duckdb; only phase 3 touches whole rows:
  1. one task per input file reads it once and hash-partitions its rows by normalised key
     into B bucket files (OUT/_work/p1-<file>/_b=<bucket>/), narrow: the key and its 64-bit
     hash, the keep rule's scores, LAION's hash, the source (file index, row index) and why a
     row is unusable (null/blank URL, null TEXT), if it is;
  2. one task per bucket: all rows of one key are in one bucket, so a window over the bucket
     keeps exactly one row per key (highest aesthetic, then highest similarity, then smallest
     hash; ties broken by source path and row); every row of the bucket goes to the ledger
     (kept; duplicate with the kept row's hash as `ref`; failed with the reason) and the
     dropped rows' (file, row) to OUT/_work/p2-<bucket>/_src=<file>/;
  3. one task per input file reads it once more and writes its rows minus the dropped ones
     (an anti-join on the row index: the dropped rows are the small side) to
     OUT/part-<file>.parquet in input order.
B depends only on the input (rows / rows_per_bucket, or `buckets`), never on the worker count,
so the output is the same whatever the file order, the cluster size or a crash and rerun.

Fused (`curate run` of dedup then a row-local step such as filter, see curate.steps): each
phase 3 task also runs the next step's kernel on the part's kept rows, as they will read back
from OUT/part-<file>.parquet, and stages its outputs in the next step's folder; the next
step's run then adopts them by rename, so the kept rows are not written and read twice.
"""
from __future__ import annotations

import glob
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from curate.metadata import exec as mx
from curate.metadata import io as mio
from core import ledger
from core.config import execution
from core.units import Resources, Unit, run_units
from curate.steps import Step


def url_key_sql(expr: str) -> str:
    """mio.trim_sql(expr), but only strings that start or end with URL whitespace are trimmed:
    the same result, and most URLs skip the trim (0.38 -> 0.15 us/row measured)."""
    codes = ", ".join(str(ord(c)) for c in mio.URL_WHITESPACE)
    return (f"(CASE WHEN ascii({expr}) IN ({codes}) OR ascii({expr}[-1:]) IN ({codes}) "
            f"THEN {mio.trim_sql(expr)} ELSE {expr} END)")


# Key kind -> SQL of the normalised key (duckdb resolves URL/TEXT case-insensitively).
KEYS: dict[str, str] = {
    "url": url_key_sql("URL"),
    "url_text": url_key_sql("URL") + " || chr(31) || TEXT",
    "hash": "hash::VARCHAR",
}


@dataclass
class DedupConfig:
    key: str = "url"  # what makes rows duplicates: url (trimmed) | url_text | hash
    buckets: int = 0  # hash partitions of phase 2; 0 = ceil(input rows / rows_per_bucket)
    rows_per_bucket: int = 500_000  # sizes buckets when `buckets` is 0 (a bucket is sorted in one task)
    threads: int = execution(1)  # duckdb threads and Ray CPUs per task
    memory: str = execution("1GB")  # duckdb memory limit per task (beyond it duckdb spills to OUT/_work)

    def __post_init__(self) -> None:
        if self.key not in KEYS:
            raise ValueError(f"key must be one of {', '.join(KEYS)}, got {self.key!r}")
        if self.buckets < 0 or self.rows_per_bucket < 1 or self.threads < 1:
            raise ValueError("buckets must be >= 0, rows_per_bucket and threads >= 1")


def bucket_count(cfg: DedupConfig, rows: int) -> int:
    """B: fixed by the config and the input size only (so results never depend on workers)."""
    return cfg.buckets or max(1, math.ceil(rows / cfg.rows_per_bucket))


def order_sql() -> str:
    """The keep rule as a window ORDER BY over phase 1's narrow columns (`_a`, `_s`: aesthetic
    and similarity with NaN as NULL, so missing scores sort last)."""
    return "_a DESC NULLS LAST, _s DESC NULLS LAST, hash ASC NULLS LAST, _src ASC, _row ASC"


NULL_HASH = "null hash"  # `failed` reason of a row without hash under key=hash


def ledger_reasons(cfg: DedupConfig) -> list[str]:
    """Every reason dedup's ledger can hold: why a row failed, or the key kind of a duplicate."""
    return [*mio.INVALID_REASONS, NULL_HASH, cfg.key]


def bad_sql(f: mio.InputFile, key: str) -> str:
    """Reason a row cannot be deduplicated (null/blank URL, null TEXT, null hash), else NULL."""
    bad = mio.invalid_reason_sql(f)
    return f"coalesce({bad}, CASE WHEN hash IS NULL THEN {mio.sql_str(NULL_HASH)} END)" if key == "hash" else bad


def _narrow_select(f: mio.InputFile, idx: int, cfg: DedupConfig, buckets: int, hash_type: str,
                   have: set[str], src: str) -> str:
    """Phase 1's rows: only what the keep rule and the ledger need, never the whole row."""
    score = lambda c: mio.num_sql(c) if c in have else "NULL::DOUBLE"  # noqa: E731
    hash_ = "hash" if "hash" in have else "NULL"
    # The key is computed once in the inner SELECT and hashed outside it (writing the key
    # expression twice evaluated it twice: 1.04 -> 0.87 CPU s per 1.25M rows). Its 64-bit
    # hash `_h` is kept: it places the row in a bucket, and phase 2's window partitions on it
    # before the key, so most comparisons are of integers, not URLs (0.30 -> 0.25 CPU s per
    # 500k-row bucket).
    narrow = (f"SELECT file_row_number AS _row, {idx}::INTEGER AS _src, {KEYS[cfg.key]} AS _key, {bad_sql(f, cfg.key)} AS _bad, "
              f"({hash_})::{hash_type} AS hash, {score('aesthetic')} AS _a, {score('similarity')} AS _s FROM {src}")
    return f"SELECT *, _h % {buckets} AS _b FROM (SELECT *, hash(_key) AS _h FROM ({narrow}))"


def _write_dir(con: Any, select: str, by: str, tmp: Path, final: Path) -> None:
    """COPY `select` hive-partitioned by column `by` into folder `final`, via `tmp` and a rename."""
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    # snappy: as fast to write as no compression here (lz4_raw was slower), and half the disk.
    con.execute(f"COPY ({select}) TO {mio.sql_str(str(tmp))} ({mx.PARQUET}, PARTITION_BY ({by}), COMPRESSION snappy)")
    shutil.rmtree(final, ignore_errors=True)  # a half-renamed earlier attempt
    os.replace(tmp, final)


def _partition(f: mio.InputFile, idx: int, cfg: DedupConfig, buckets: int, hash_type: str, out: Path) -> dict[str, Any]:
    """Phase 1 task: one read of the file; every row's narrow columns (key, scores, hash,
    source file and row index, why it is unusable) go to the bucket of its key."""
    work = out / "_work"
    con = mio.connect(cfg.threads, cfg.memory, str(work / "_duckdb"))
    src = mio.scan(f, con)
    select = _narrow_select(f, idx, cfg, buckets, hash_type, mio.relation_columns(con, src), src)
    _write_dir(con, select, "_b", work / f"_tmp.p1-{idx:05d}.{os.getpid()}", work / f"p1-{idx:05d}")
    con.close()
    return {"rows": f.rows}


def _dedup_bucket(k: int, cfg: DedupConfig, sources: list[str], hash_type: str, out: Path) -> dict[str, Any]:
    """Phase 2 task: keep one row per key of bucket k; ledger every row of the bucket, and list
    the dropped rows' (source, row) in OUT/_work/p2-<k>/_src=<source>/ for phase 3 (duplicates
    and failed rows: usually a small share, so phase 3's join has a small build side)."""
    work = out / "_work"
    con = mio.connect(cfg.threads, cfg.memory, str(work / "_duckdb"))
    files = sorted(glob.glob(str(work / "p1-*" / f"_b={k}" / "*.parquet")))
    final = work / f"p2-{k:05d}"
    if not files:  # an empty bucket still gets an (empty) ledger part: uniform layout
        empty = mx.ledger_select("dedup", "NULL", "0", "NULL", "NULL", key_type=hash_type, sources=sources,
                                 reasons=ledger_reasons(cfg))
        mx.write_ledger(con, f"SELECT {empty} LIMIT 0", out, f"p2-{k:05d}")
        final.mkdir(parents=True, exist_ok=True)
        return {}
    bucket = f"read_parquet({mio.sql_list(files)}, hive_partitioning=false)"
    # Unusable rows get their own window partitions (a null-TEXT row must not win its URL).
    con.execute(
        f"CREATE TEMP TABLE r AS SELECT _src, _row, _bad, hash, row_number() OVER w AS _rn, first_value(hash) OVER w AS _ref "
        f"FROM {bucket} WINDOW w AS (PARTITION BY _bad IS NULL, _h, _key ORDER BY {order_sql()})"
    )
    dropped = "SELECT _src, _row FROM r WHERE _bad IS NOT NULL OR _rn > 1"
    _write_dir(con, dropped, "_src", work / f"_tmp.p2-{k:05d}.{os.getpid()}", final)
    source = f"{mio.sql_list(sources)}[_src + 1]"
    state = "CASE WHEN _bad IS NOT NULL THEN 'failed' WHEN _rn = 1 THEN 'kept' ELSE 'duplicate' END"
    dup = lambda e: f"CASE WHEN _bad IS NULL AND _rn > 1 THEN {e} END"  # noqa: E731
    reason = f"coalesce(_bad, {dup(mio.sql_str(cfg.key))})"
    select = mx.ledger_select("dedup", source, "_row", "hash", state, reason, "NULL", dup("_ref"),
                              key_type=hash_type, sources=sources, reasons=ledger_reasons(cfg))
    mx.write_ledger(con, f"SELECT {select} FROM r", out, f"p2-{k:05d}")
    con.close()
    return {}


@dataclass(frozen=True)
class Tail:
    """The next step's per-part work, run inside phase 3's tasks (fusion)."""

    write: Callable[..., dict[str, Any]]  # its curate.steps.Fusable.write
    cfg: Any  # its config
    columns: list[tuple[str, str]]  # its input columns: dedup's parts as duckdb reads them back
    staged: Path  # where its outputs are staged (inside its output folder)
    parts: dict[int, tuple[str, str]]  # part index -> (part path as the next step lists it, its task name)


def _run_tail(con: Any, i: int, kept: str, tail: Tail) -> None:
    """Run the next step's kernel on part i's rows (relation `kept`, with their row index in
    OUT/part-<i>.parquet as `file_row_number`), then record its outputs as staged."""
    path, task = tail.parts[i]
    rows = int(con.execute(f"SELECT count(*) FROM {kept}").fetchone()[0])
    f = mio.InputFile(path, rows, 0, tuple(c for c, _ in tail.columns))
    info = tail.write(con, tail.cfg, f, kept, tail.columns, tail.staged, task)
    mx.stage_done(tail.staged, task, path, info, [f"{task}.parquet", f"{ledger.LEDGER_DIR}/{task}.parquet"])


def _write_part(f: mio.InputFile, i: int, cfg: DedupConfig, columns: list[tuple[str, str]], out: Path,
                tail: Tail | None = None) -> dict[str, Any]:
    """Phase 3 task: one read of input file i; its rows minus those phase 2 dropped (listed over
    all buckets) -> OUT/part-<i>.parquet in input order; with a tail, the next step's outputs
    for that part too, from the same rows in memory."""
    work = out / "_work"
    con = mio.connect(cfg.threads, cfg.memory, str(work / "_duckdb"))
    src = mio.scan(f, con)
    lists = sorted(glob.glob(str(work / "p2-*" / f"_src={i}" / "*.parquet")))
    rows = f"read_parquet({mio.sql_list(lists)}, hive_partitioning=false)" if lists else "(SELECT NULL::BIGINT AS _row LIMIT 0)"
    project = mio.project_sql(mio.relation_columns(con, src), columns)
    # Anti-join on the dropped rows rather than a semi-join on the kept ones: the hash table
    # holds ~10% of the rows, not ~90% (1.25M rows, 9% dropped: 0.64 -> 0.51 CPU s). The
    # dropped rows of a file are a subset of it, so the file is always the probe side and,
    # on one thread, the join streams it in input order. With more threads duckdb appends
    # the probe's row groups as they finish (seen: one block swapped in 1.1M rows), so the
    # ORDER BY restores input order (~0.15 CPU s per 1.25M rows; not paid on one thread).
    order = " ORDER BY s.file_row_number" if cfg.threads > 1 else ""
    kept = f"SELECT {project} FROM {src} s ANTI JOIN {rows} k ON s.file_row_number = k._row{order}"
    part = out / f"part-{i:05d}.parquet"
    if tail is None:
        mx.copy_to(con, kept, part)
    else:
        con.execute(f"CREATE TEMP TABLE kept AS {kept}")
        mx.copy_to(con, "SELECT * FROM kept", part)  # insertion order
        # A fresh table's rowid is its insertion index, i.e. the row's index in the part file.
        _run_tail(con, i, "(SELECT *, rowid AS file_row_number FROM kept)", tail)
    con.close()
    return {}


def run(cfg: DedupConfig, inp: str, out: str) -> dict[str, Any]:
    """Deduplicate every parquet file of `inp` into `out`; returns the stats."""
    return _run(cfg, inp, out)[0]


def fuse_next(cfg: DedupConfig, inp: str, out: str, nxt: Step, nxt_cfg: Any, nxt_out: str) -> list[dict[str, Any]]:
    """Dedup `inp` into `out` and run the row-local step `nxt` on its output into `nxt_out` in
    the same part tasks (curate.steps); returns both stats. If `nxt` cannot run on dedup's
    columns it runs on its own afterwards (and reports its own error)."""
    return _run(cfg, inp, out, (nxt, nxt_cfg, Path(nxt_out)))


def _run(cfg: DedupConfig, inp: str, out: str, fuse: tuple[Step, Any, Path] | None = None) -> list[dict[str, Any]]:
    files = mio.load_inputs(inp, ["URL", "TEXT"] + (["hash"] if cfg.key == "hash" else []))
    con = mio.connect()
    columns = mio.unified_columns(files, con)
    if "hash" not in {c.lower() for c, _ in columns}:
        columns.append(("hash", "BIGINT"))  # computed for files that lack it (LAION's definition)
    buckets = bucket_count(cfg, sum(f.rows for f in files))
    out_path = Path(out)
    rd = mx.open_run(out_path, "dedup", cfg, inp, files, buckets=buckets)
    mx.clean_temp_dirs(out_path / "_work")
    tail = _tail(con, rd, columns, len(files), *fuse) if fuse else None
    hash_type = dict((c.lower(), t) for c, t in columns)["hash"]
    res = Resources(cpus=cfg.threads)
    p1 = [Unit(f"p1-{i:05d}", (f, i, cfg, buckets, hash_type, out_path)) for i, f in enumerate(files)]
    run_units(rd, p1, _partition, "dedup: partition", res)
    sources = [f.path for f in files]
    p2 = [Unit(f"p2-{k:05d}", (k, cfg, sources, hash_type, out_path)) for k in range(buckets)]
    run_units(rd, p2, _dedup_bucket, "dedup: buckets", res)
    p3 = [Unit(f"p3-{i:05d}", (f, i, cfg, columns, out_path, tail)) for i, f in enumerate(files)]
    run_units(rd, p3, _write_part, "dedup: parts" + (f" + {fuse[0].name}" if tail else ""), res)
    shutil.rmtree(out_path / "_work", ignore_errors=True)  # buckets are consumed; markers stay
    stats = [mx.finish(out_path, "dedup", files, key=cfg.key, buckets=buckets, input_files=len(files))]
    if fuse:
        nxt, nxt_cfg, nxt_out = fuse
        stats.append(nxt.run(nxt_cfg, str(out_path), str(nxt_out), staged=tail.staged if tail else None))
    return stats


def _tail(con: Any, rd: Any, columns: list[tuple[str, str]], parts: int, nxt: Step, nxt_cfg: Any,
          nxt_out: Path) -> Tail | None:
    """The next step's work for the part tasks (phase 3), or None when it cannot run on dedup's output
    (a missing column: it then runs on its own and says so). Its input columns and part names
    are what it would find reading dedup's finished output folder."""
    probe = rd.path / "_work" / "_columns.parquet"  # an empty part, with dedup's output columns
    mx.copy_to(con, f"SELECT {mio.project_sql(set(), columns)} LIMIT 0", probe)
    try:
        mio.require(mio.inspect(probe), nxt.fusable.required(nxt_cfg))
    except mio.MetadataError:
        return None
    nxt_columns = mio.unified_columns([mio.inspect(probe)], con)
    paths = {i: (rd.path / f"part-{i:05d}.parquet").resolve() for i in range(parts)}
    order = {p: i for i, p in enumerate(sorted(paths.values()))}  # the next step's file order
    staged = mx.staged_dir(nxt_out, rd, nxt.name, nxt_cfg)
    mx.clean_staged(nxt_out, keep=staged)
    return Tail(nxt.fusable.write, nxt_cfg, nxt_columns, staged, {i: (str(p), nxt.fusable.task(order[p])) for i, p in paths.items()})


STEP = Step("dedup", DedupConfig, run, fuse_next=fuse_next)
