"""`curate dedup`: exact deduplication of LAION-style metadata, globally correct on Ray.

Three phases of Ray tasks, all duckdb; only phase 3 touches whole rows:
  1. one task per input file reads it once and hash-partitions its rows by normalised key into
     B buckets, narrow: the key and its 64-bit hash, the keep rule's scores, LAION's hash, the
     row index and why a row is unusable, if it is. It writes ONE bundle (curate.metadata.shuffle:
     a parquet blob per bucket) and records each bucket's row count in its marker;
  2. one task per bucket reads its blob of every phase-1 bundle (each checked against the
     count phase 1 recorded: a missing or short blob is an error, never an empty bucket). All
     rows of one key are in one bucket, so a window keeps exactly one row per key (highest
     aesthetic, then highest similarity, then smallest hash; ties broken by source file and
     row); every row of the bucket goes to the ledger (kept; duplicate with the kept row's hash
     as `ref`; failed with the reason), and the dropped rows' indexes to one bundle of a blob
     per source file, counts in its marker;
  3. one task per input file reads it once more, and its dropped rows from every phase-2
     bundle (checked the same way), and writes its rows minus the dropped ones (a keep flag per
     row, joined by position) to OUT/part-<file>.parquet in input order.
Files created: one bundle per phase-1 and phase-2 task, a ledger part per bucket, a part per
input file, a marker per task: O(tasks), whatever the number of files times buckets.
B depends only on the input (rows / rows_per_bucket, or `buckets`), never on the worker count,
so the output is the same whatever the file order, the cluster size or a crash and rerun.

Fused (`curate run` of dedup then a row-local step such as filter, see curate.steps): each
phase 3 task also runs the next step's kernel on the part's kept rows, as they will read back
from OUT/part-<file>.parquet, and stages its outputs in the next step's folder; the next
step's run then adopts them, so the kept rows are not written and read twice.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

from core import ledger, storage
from core.config import execution
from core.storage import AnyPath
from core.units import Resources, Unit, run_units, unfinished
from curate.metadata import exec as mx
from curate.metadata import io as mio
from curate.metadata import shuffle
from curate.steps import Step


def url_key_sql(expr: str) -> str:
    """mio.trim_sql(expr), but only strings that start or end with URL whitespace are trimmed:
    the same result, and most URLs skip the trim (0.38 -> 0.15 us/row measured)."""
    codes = ", ".join(str(ord(c)) for c in mio.URL_WHITESPACE)
    return (f"(CASE WHEN ascii({expr}) IN ({codes}) OR ascii({expr}[-1:]) IN ({codes}) "
            f"THEN {mio.trim_sql(expr)} ELSE {expr} END)")


# Key kind -> SQL of the normalised key, from the SQL of the file's URL and TEXT.
KEYS: dict[str, Callable[[str, str], str]] = {
    "url": lambda url, text: url_key_sql(url),
    "url_text": lambda url, text: f"{url_key_sql(url)} || chr(31) || {text}",
    "hash": lambda url, text: "hash::VARCHAR",
}


@dataclass
class DedupConfig:
    key: str = "url"  # what makes rows duplicates: url (trimmed) | url_text | hash
    buckets: int = 0  # hash partitions of phase 2; 0 = ceil(input rows / rows_per_bucket)
    rows_per_bucket: int = 500_000  # sizes buckets when `buckets` is 0 (a bucket is sorted in one task)
    threads: int = execution(1)  # duckdb threads and Ray CPUs per task
    memory: str = execution("1GB")  # duckdb memory limit per task (beyond it duckdb spills to task-local scratch)
    allow_incomplete: bool = execution(False)  # read an unfinished upstream step's folder as it is

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
    and similarity, NULL when missing or not a finite number, so they sort last)."""
    return "_a DESC NULLS LAST, _s DESC NULLS LAST, hash ASC NULLS LAST, _src ASC, _row ASC"


NULL_HASH = "null hash"  # `failed` reason of a row without hash under key=hash
SCORES = ("aesthetic", "similarity")  # the keep rule's score columns


def ledger_reasons(cfg: DedupConfig) -> list[str]:
    """Every reason dedup's ledger can hold: why a row failed, or the key kind of a duplicate."""
    return [*mio.invalid_reasons(SCORES), NULL_HASH, cfg.key]


def bad_sql(f: mio.InputFile, key: str) -> str:
    """Reason a row cannot be deduplicated (see mio.invalid_reason_sql; null hash under
    key=hash), else NULL."""
    bad = mio.invalid_reason_sql(f, SCORES)
    return f"coalesce({bad}, CASE WHEN hash IS NULL THEN {mio.sql_str(NULL_HASH)} END)" if key == "hash" else bad


def _read_columns(f: mio.InputFile) -> list[str]:
    """Stored columns phase 1 reads (`hash` is computed where missing)."""
    names = ("URL", "TEXT", "hash", "aesthetic", "similarity")
    return [c for c in map(f.stored, names) if c]


def _narrow_select(f: mio.InputFile, cfg: DedupConfig, buckets: int, hash_type: str, src: str) -> str:
    """Phase 1's rows: only what the keep rule and the ledger need, never the whole row."""
    score = lambda c: mio.finite_sql(f, c) if f.stored(c) else "NULL::DOUBLE"  # noqa: E731
    key = KEYS[cfg.key](mio.text_sql(f, "URL"), mio.text_sql(f, "TEXT"))
    # The key is computed once in the inner SELECT and hashed outside it (writing the key
    # expression twice evaluated it twice: 1.04 -> 0.87 CPU s per 1.25M rows). Its 64-bit
    # hash `_h` is kept: it places the row in a bucket, and phase 2's window partitions on it
    # before the key, so most comparisons are of integers, not URLs (0.30 -> 0.25 CPU s per
    # 500k-row bucket).
    narrow = (f"SELECT file_row_number AS _row, {key} AS _key, {bad_sql(f, cfg.key)} AS _bad, "
              f"(hash)::{hash_type} AS hash, {score('aesthetic')} AS _a, {score('similarity')} AS _s FROM {src}")
    return f"SELECT *, (_h % {buckets})::INTEGER AS _b FROM (SELECT *, hash(_key) AS _h FROM ({narrow}))"


def _partition(f: mio.InputFile, idx: int, cfg: DedupConfig, buckets: int, hash_type: str, out: AnyPath) -> dict[str, Any]:
    """Phase 1 task: one read of the file; every row's narrow columns go to the blob of its
    key's bucket in this file's bundle."""
    attempt = mx.attempt()

    def body(safe: bool) -> dict[str, Any]:
        with mio.task_connection(cfg.threads, cfg.memory) as con:
            scan = mio.Scan(f, con, columns=_read_columns(f), with_hash=True, safe=safe)
            dest = mx.output(out, f"_work/p1-{idx:05d}.bundle", attempt)
            # Rows in file order within a blob: the same bytes whatever duckdb's threads.
            index = shuffle.write(con, _narrow_select(f, cfg, buckets, hash_type, scan()), "_b", dest, order="_row")
        return {"rows": f.rows, "bundle": index, "files": [mx.rel(out, dest)]}

    return mio.safe_retry(body)


def _dedup_bucket(pieces: shuffle.Pieces, cfg: DedupConfig, sources: list[str], hash_type: str,
                  out: AnyPath) -> dict[str, Any]:
    """Phase 2 task: keep one row per key of bucket k; ledger every row of the bucket, and list
    the dropped rows' indexes per source file for phase 3 (duplicates and failed rows: usually
    a small share, so phase 3's join has a small build side)."""
    k, attempt = pieces.part, mx.attempt()
    led = mx.ledger_path(out, f"p2-{k:05d}", attempt)
    with mio.task_connection(cfg.threads, cfg.memory) as con:
        table = shuffle.read(pieces, source="_src")
        if table is None:  # an empty bucket still gets an (empty) ledger part: uniform layout
            empty = mx.ledger_select("dedup", "NULL", "0", "NULL", "NULL", key_type=hash_type, sources=sources,
                                     reasons=ledger_reasons(cfg))
            mx.write_ledger(con, f"SELECT {empty} LIMIT 0", led)
            return {"dropped": None, "files": [mx.rel(out, led)]}
        con.register("bucket", table)
        # Unusable rows get their own window partitions (a null-TEXT row must not win its URL).
        con.execute(
            f"CREATE TEMP TABLE r AS SELECT _src, _row, _bad, hash, row_number() OVER w AS _rn, "
            f"first_value(hash) OVER w AS _ref FROM bucket WINDOW w AS (PARTITION BY _bad IS NULL, _h, _key "
            f"ORDER BY {order_sql()})")
        con.unregister("bucket")
        del table
        dest = mx.output(out, f"_work/p2-{k:05d}.bundle", attempt)
        dropped = shuffle.write(con, "SELECT _src, _row FROM r WHERE _bad IS NOT NULL OR _rn > 1", "_src", dest, order="_row")
        source = f"{mio.sql_list(sources)}[_src + 1]"
        state = "CASE WHEN _bad IS NOT NULL THEN 'failed' WHEN _rn = 1 THEN 'kept' ELSE 'duplicate' END"
        dup = lambda e: f"CASE WHEN _bad IS NULL AND _rn > 1 THEN {e} END"  # noqa: E731
        reason = f"coalesce(_bad, {dup(mio.sql_str(cfg.key))})"
        select = mx.ledger_select("dedup", source, "_row", "hash", state, reason, "NULL", dup("_ref"),
                                  key_type=hash_type, sources=sources, reasons=ledger_reasons(cfg))
        mx.write_ledger(con, f"SELECT {select} FROM r", led)
    return {"dropped": dropped, "files": [mx.rel(out, dest), mx.rel(out, led)]}


@dataclass(frozen=True)
class Tail:
    """The next step's per-part work, run inside phase 3's tasks (fusion)."""

    write: Callable[..., dict[str, Any]]  # its curate.steps.Fusable.write
    cfg: Any  # its config
    columns: list[tuple[str, str]]  # its input columns: dedup's parts as duckdb reads them back
    schema: Any  # pyarrow schema of dedup's parts (what the next step's inspect would see)
    staged: AnyPath  # where its outputs are staged (inside its output folder)
    names: dict[int, str]  # part index -> its task name in the next step


def _run_tail(con: Any, f: mio.InputFile, i: int, part: AnyPath, kept: str, tail: Tail) -> None:
    """Run the next step's kernel on part i's rows (relation `kept`, with their row index in
    the part as `file_row_number`), then record its outputs as staged."""
    task = tail.names[i]
    rows = int(con.execute(f"SELECT count(*) FROM {kept}").fetchone()[0])
    g = mio.InputFile(str(part), rows, 0, tail.schema)
    info = tail.write(con, tail.cfg, g, lambda: kept, tail.columns, tail.staged, task, mx.attempt(), checked=True)
    mx.stage_done(tail.staged, task, str(part), info)


def _write_part(f: mio.InputFile, i: int, cfg: DedupConfig, columns: list[tuple[str, str]], dropped: shuffle.Pieces,
                out: AnyPath, tail: Tail | None = None) -> dict[str, Any]:
    """Phase 3 task: one read of input file i; its rows minus those phase 2 dropped (from every
    bucket's bundle) -> OUT/part-<i>.parquet in input order; with a tail, the next step's
    outputs for that part too, from the same rows in memory."""
    attempt = mx.attempt()
    part = mx.output(out, f"part-{i:05d}.parquet", attempt)

    def body(safe: bool) -> dict[str, Any]:
        with mio.task_connection(cfg.threads, cfg.memory) as con:
            scan = mio.Scan(f, con, with_hash=True, safe=safe)
            con.register("keep", keep_mask(f.rows, shuffle.read(dropped, columns=["_row"])))
            project = mio.project_sql(mio.file_columns(f) | {"hash"}, columns)
            # A positional join with a keep flag per row: no hash table, and the file is read
            # once in input order whatever the threads or the reader (an anti-join on the row
            # index left the order to duckdb's choice of build side: a pyarrow stream, of
            # unknown size, was seen built on; 1.25M rows, 9% dropped: 0.53 -> 0.47 CPU s).
            kept = f"SELECT {project} FROM {scan()} s POSITIONAL JOIN keep k WHERE k._keep"
            if tail is None:
                mx.copy_to(con, kept, part)
            else:
                con.execute(f"CREATE TEMP TABLE kept AS {kept}")
                mx.copy_to(con, "SELECT * FROM kept", part)  # insertion order
                # A fresh table's rowid is its insertion index, i.e. the row's index in the part file.
                _run_tail(con, f, i, part, "(SELECT *, rowid AS file_row_number, NULL::VARCHAR AS _invalid FROM kept)", tail)
            info = {"files": [mx.rel(out, part)]}
            if scan.repaired:
                info["repaired_utf8"] = scan.repaired
            return info

    return mio.safe_retry(body)


def keep_mask(rows: int, dropped: "pa.Table | None") -> "pa.Table":
    """A table of one `_keep` flag per row of a file: false at the dropped rows' indexes."""
    import numpy as np
    import pyarrow as pa

    keep = np.ones(rows, bool)
    if dropped is not None:
        index = dropped.column("_row").to_numpy()
        if len(index) and (index.min() < 0 or index.max() >= rows):
            raise shuffle.ShuffleError(f"a dropped row index lies outside the file's {rows} rows")
        keep[index] = False
    return pa.table({"_keep": keep})


def run(cfg: DedupConfig, inp: str, out: str) -> dict[str, Any]:
    """Deduplicate every parquet file of `inp` into `out`; returns the stats."""
    return _run(cfg, inp, out)[0]


def fuse_next(cfg: DedupConfig, inp: str, out: str, nxt: Step, nxt_cfg: Any, nxt_out: str) -> list[dict[str, Any]]:
    """Dedup `inp` into `out` and run the row-local step `nxt` on its output into `nxt_out` in
    the same part tasks (curate.steps); returns both stats. If `nxt` cannot run on dedup's
    columns it runs on its own afterwards (and reports its own error)."""
    return _run(cfg, inp, out, (nxt, nxt_cfg, storage.path(nxt_out)))


def _run(cfg: DedupConfig, inp: str, out: str, fuse: tuple[Step, Any, AnyPath] | None = None) -> list[dict[str, Any]]:
    files = mio.load_inputs(inp, ["URL", "TEXT"] + (["hash"] if cfg.key == "hash" else []), cfg.allow_incomplete)
    con = mio.connect()
    columns = mio.unified_columns(files, con)
    if "hash" not in {c.lower() for c, _ in columns}:
        columns.append(("hash", "BIGINT"))  # computed for files that lack it (LAION's definition)
    buckets = bucket_count(cfg, sum(f.rows for f in files))
    out_path = storage.path(out)
    rd = mx.open_run(out_path, "dedup", cfg, inp, files, buckets=buckets)
    tail = _tail(con, rd, columns, files, *fuse) if fuse else None
    hash_type = dict((c.lower(), t) for c, t in columns)["hash"]
    res = Resources(cpus=cfg.threads)
    # A phase's bundles (in _work/, removed at the end) are checked only when a later phase still
    # has work: after a finished run, a part or ledger lost by hand redoes the phases before it.
    known: dict[str, dict | None] = {}  # the later phases' markers, read once
    redo3 = bool(unfinished(rd, [f"p3-{i:05d}" for i in range(len(files))], known))
    redo2 = redo3 or bool(unfinished(rd, [f"p2-{b:05d}" for b in range(buckets)], known))
    p1 = [Unit(f"p1-{i:05d}", (f, i, cfg, buckets, hash_type, out_path)) for i, f in enumerate(files)]
    maps = run_units(rd, p1, _partition, "dedup: partition", res, transient=redo2)
    sources = [f.path for f in files]
    p2 = [Unit(f"p2-{p.part:05d}", (p, cfg, sources, hash_type, out_path), input=p.digest())
          for p in shuffle.plan(out_path / "_work", [m["bundle"] for m in maps], buckets)]
    reduces = run_units(rd, p2, _dedup_bucket, "dedup: buckets", res, transient=redo3, known=known)
    lists = shuffle.plan(out_path / "_work", [r["dropped"] or _EMPTY for r in reduces], len(files))
    p3 = [Unit(f"p3-{i:05d}", (f, i, cfg, columns, lists[i], out_path, tail), input=lists[i].digest())
          for i, f in enumerate(files)]
    parts = run_units(rd, p3, _write_part, "dedup: parts" + (f" + {fuse[0].name}" if tail else ""), res,
                      known=known)
    storage.rmtree(out_path / "_work")  # buckets and lists are consumed; markers stay
    repaired = sum(p.get("repaired_utf8", 0) for p in parts)
    stats = [mx.finish(out_path, "dedup", files, [*reduces, *parts], key=cfg.key, buckets=buckets,
                       input_files=len(files), **({"repaired_utf8": repaired} if repaired else {}))]
    if fuse:
        nxt, nxt_cfg, nxt_out = fuse
        stats.append(nxt.run(nxt_cfg, str(out_path), str(nxt_out), staged=tail.staged if tail else None))
    return stats


_EMPTY = {"bundle": "", "parts": [], "bounds": [0], "rows": []}  # the list of an empty bucket


def _tail(con: Any, rd: Any, columns: list[tuple[str, str]], files: list[mio.InputFile], nxt: Step, nxt_cfg: Any,
          nxt_out: AnyPath) -> Tail | None:
    """The next step's work for the part tasks (phase 3), or None when it cannot run on dedup's
    output (a missing column: it then runs on its own and says so). Its input columns and
    task names are what it would find reading dedup's finished output folder."""
    import pyarrow as pa

    empty = con.sql(f"SELECT {mio.project_sql(set(), columns)} LIMIT 0").to_arrow_table()
    probe = mio.InputFile("parts", 0, 0, pa.schema([f.with_type(mio.plain_type(f.type)) for f in empty.schema]))
    try:
        mio.require(probe, nxt.fusable.required(nxt_cfg))
    except mio.MetadataError:
        return None
    staged = mx.staged_dir(nxt_out, rd, nxt.name, nxt_cfg)
    mx.clean_staged(nxt_out, keep=staged)
    return Tail(nxt.fusable.write, nxt_cfg, mio.unified_columns([probe], con), probe.schema, staged,
                {i: nxt.fusable.task(i) for i in range(len(files))})


STEP = Step("dedup", DedupConfig, run, fuse_next=fuse_next)
