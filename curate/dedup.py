"""`curate dedup`: exact deduplication of LAION-style metadata, globally correct on Ray.

Two phases of Ray tasks, both duckdb:
  1. one task per input file reads it once and hash-partitions its rows by normalised key
     into B bucket files (OUT/_work/p1-<file>/_b=<bucket>/), tagged with their source (file
     index, row index) and why a row is unusable (null/blank URL, null TEXT), if it is;
  2. one task per bucket: all rows of one key are in one bucket, so a window over the bucket
     keeps exactly one row per key (highest aesthetic, then highest similarity, then smallest
     hash; ties broken by source path and row), written to OUT/part-<bucket>.parquet in input
     order; every other row is a `duplicate` in the ledger with the kept row's hash as `ref`,
     and unusable rows are `failed` with the reason.
B depends only on the input (rows / rows_per_bucket, or `buckets`), never on the worker count,
so the output is the same whatever the file order, the cluster size or a crash and rerun.
"""
from __future__ import annotations

import glob
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from curate import metadata_exec as mx
from curate import metadata_io as mio
from curate.steps import Step

# Key kind -> SQL of the normalised key (duckdb resolves URL/TEXT case-insensitively).
KEYS: dict[str, str] = {
    "url": mio.trim_sql("URL"),
    "url_text": mio.trim_sql("URL") + " || chr(31) || TEXT",
    "hash": "hash::VARCHAR",
}


@dataclass
class DedupConfig:
    key: str = "url"  # what makes rows duplicates: url (trimmed) | url_text | hash
    buckets: int = 0  # hash partitions of phase 2; 0 = ceil(input rows / rows_per_bucket)
    rows_per_bucket: int = 500_000  # sizes buckets when `buckets` is 0 (a bucket is sorted in one task)
    threads: int = 1  # duckdb threads and Ray CPUs per task
    memory: str = "1GB"  # duckdb memory limit per task (beyond it duckdb spills to OUT/_work)

    def __post_init__(self) -> None:
        if self.key not in KEYS:
            raise ValueError(f"key must be one of {', '.join(KEYS)}, got {self.key!r}")
        if self.buckets < 0 or self.rows_per_bucket < 1 or self.threads < 1:
            raise ValueError("buckets must be >= 0, rows_per_bucket and threads >= 1")


def bucket_count(cfg: DedupConfig, rows: int) -> int:
    """B: fixed by the config and the input size only (so results never depend on workers)."""
    return cfg.buckets or max(1, math.ceil(rows / cfg.rows_per_bucket))


def order_sql(names: set[str]) -> str:
    """The keep rule as a window ORDER BY; NaN scores count as missing (sort last)."""
    score = lambda c: mio.num_sql(c) if c in names else "NULL::DOUBLE"  # noqa: E731
    return (f"{score('aesthetic')} DESC NULLS LAST, {score('similarity')} DESC NULLS LAST, "
            "hash ASC NULLS LAST, _src ASC, _row ASC")


def bad_sql(f: mio.InputFile, key: str) -> str:
    """Reason a row cannot be deduplicated (null/blank URL, null TEXT, null hash), else NULL."""
    bad = mio.invalid_reason_sql(f)
    return f"coalesce({bad}, CASE WHEN hash IS NULL THEN 'null hash' END)" if key == "hash" else bad


def _partition(f: mio.InputFile, idx: int, cfg: DedupConfig, buckets: int,
               columns: list[tuple[str, str]], out: Path) -> dict[str, Any]:
    """Phase 1 task: one read of the file; every row goes to the bucket of its key, tagged with
    its source (file index, row index) and `_bad` (why it is unusable, else NULL)."""
    work = out / "_work"
    con = mio.connect(cfg.threads, cfg.memory, str(work / "_duckdb"))
    src = mio.scan(f, con)
    key = KEYS[cfg.key]
    select = (f"SELECT {mio.project_sql(mio.relation_columns(con, src), columns)}, file_row_number AS _row, "
              f"{idx}::INTEGER AS _src, {key} AS _key, {bad_sql(f, cfg.key)} AS _bad, hash({key}) % {buckets} AS _b "
              f"FROM {src}")
    tmp, final = work / f"_tmp.p1-{idx:05d}.{os.getpid()}", work / f"p1-{idx:05d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    con.execute(f"COPY ({select}) TO {mio.sql_str(str(tmp))} (FORMAT parquet, PARTITION_BY (_b), COMPRESSION lz4_raw)")
    shutil.rmtree(final, ignore_errors=True)  # a half-renamed earlier attempt
    os.replace(tmp, final)
    con.close()
    return {"rows": f.rows}


def _dedup_bucket(k: int, cfg: DedupConfig, columns: list[tuple[str, str]], sources: list[str],
                  out: Path) -> dict[str, Any]:
    """Phase 2 task: keep one row per key of bucket k; ledger kept and duplicate rows."""
    work = out / "_work"
    con = mio.connect(cfg.threads, cfg.memory, str(work / "_duckdb"))
    files = sorted(glob.glob(str(work / "p1-*" / f"_b={k}" / "*.parquet")))
    part = out / f"part-{k:05d}.parquet"
    cols = ", ".join(mio.ident(c) for c, _ in columns)
    if not files:  # an empty bucket still gets an (empty) part and ledger: uniform layout
        empty = f"SELECT {mio.project_sql(set(), columns)} LIMIT 0"
        mx.copy_to(con, empty, part)
        mx.write_ledger(con, f"SELECT {mx.ledger_select('dedup', 'NULL', '0', 'NULL', 'NULL')} LIMIT 0", out, f"p2-{k:05d}")
        return {}
    names = {c.lower() for c, _ in columns}
    # Unusable rows get their own window partitions (a null-TEXT row must not win its URL).
    con.execute(
        f"CREATE TEMP TABLE r AS SELECT *, row_number() OVER w AS _rn, first_value(hash) OVER w AS _ref "
        f"FROM read_parquet({mio.sql_list(files)}, hive_partitioning=false) "
        f"WINDOW w AS (PARTITION BY _bad IS NULL, _key ORDER BY {order_sql(names)})"
    )
    mx.copy_to(con, f"SELECT {cols} FROM r WHERE _bad IS NULL AND _rn = 1 ORDER BY _src, _row", part)
    source = f"{mio.sql_list(sources)}[_src + 1]"
    state = "CASE WHEN _bad IS NOT NULL THEN 'failed' WHEN _rn = 1 THEN 'kept' ELSE 'duplicate' END"
    dup = lambda e: f"CASE WHEN _bad IS NULL AND _rn > 1 THEN {e} END"  # noqa: E731
    reason = f"coalesce(_bad, {dup(mio.sql_str(cfg.key))})"
    mx.write_ledger(con, f"SELECT {mx.ledger_select('dedup', source, '_row', 'hash', state, reason, 'NULL', dup('_ref'))} FROM r",
                    out, f"p2-{k:05d}")
    con.close()
    return {}


def run(cfg: DedupConfig, inp: str, out: str) -> dict[str, Any]:
    """Deduplicate every parquet file of `inp` into `out`; returns the stats."""
    files = mio.load_inputs(inp, ["URL", "TEXT"] + (["hash"] if cfg.key == "hash" else []))
    con = mio.connect()
    columns = mio.unified_columns(files, con)
    if "hash" not in {c.lower() for c, _ in columns}:
        columns.append(("hash", "BIGINT"))  # computed for files that lack it (LAION's definition)
    buckets = bucket_count(cfg, sum(f.rows for f in files))
    out_path = Path(out)
    rd = mx.open_run(out_path, "dedup", cfg, files, buckets=buckets)
    mx.clean_temp_dirs(out_path / "_work")
    p1 = [(f"p1-{i:05d}", _partition, (f, i, cfg, buckets, columns, out_path)) for i, f in enumerate(files)]
    mx.run_tasks(rd, p1, "dedup: partition", cfg.threads)
    sources = [f.path for f in files]
    p2 = [(f"p2-{k:05d}", _dedup_bucket, (k, cfg, columns, sources, out_path)) for k in range(buckets)]
    mx.run_tasks(rd, p2, "dedup: buckets", cfg.threads)
    shutil.rmtree(out_path / "_work", ignore_errors=True)  # buckets are consumed; markers stay
    return mx.finish(out_path, "dedup", files, key=cfg.key, buckets=buckets, input_files=len(files))


STEP = Step("dedup", DedupConfig, run)
