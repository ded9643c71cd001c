"""Execution shared by the metadata steps: the run-folder identity of a step, where a task's
outputs go and how they are committed, atomic duckdb COPYs, ledger parts written by duckdb,
the staging of a fused next step's outputs, and the completion record.

Tasks run through `core.units` (Ray tasks with completion markers, one failure policy). A task
writes each output through a temp name (a local rename, or one upload to an object store) under
the name `output` gives it: the plain name on a local disk, an attempt-unique one on an object
store (core.storage.attempt_path). It lists what it wrote in its marker (`files`), and only
files a marker names count: `finish` deletes the others (attempts that died or were overtaken)
and writes `_stats.json` naming the step's parts and ledger parts, which is how the next step
and `core.ledger` find them (never by listing the folder).
"""
from __future__ import annotations

import json
import uuid
from typing import Any, Sequence

import duckdb

from core import atomic, ledger, rundir, storage
from core.config import config_hash, settings
from core.rundir import RunDir
from core.storage import AnyPath
from curate.metadata.io import InputFile, sql_str

# Ledger columns as SQL, in core.ledger.LEDGER_SCHEMA order and types.
LEDGER_COLUMNS = ("step", "source", "row", "key", "state", "reason", "value", "ref")


# What the metadata steps' tasks write, as a version: part of every run folder's identity, so
# a folder left mid-run by a version whose intermediate files or ledger types differ is refused
# with a clear message instead of being finished with mixed formats. Bump on such a change.
# 2: ledger key/ref keep LAION's hash type (int64), dedup's phase 2 lists the dropped rows.
# 3: identity = core.rundir.identity (settings + input fingerprint), units run by core.units.
# 4: one bundle per map task (curate.metadata.shuffle), markers name every file, outputs on
#    object stores under attempt-unique names, captions a partitioned join.
FORMAT = 4


def open_run(out: AnyPath, step: str, cfg: Any, inp: str, files: list[InputFile],
             tables: tuple[str, ...] = (), **extra: Any) -> RunDir:
    """Open the output folder with everything that decides its content: settings, the input
    fingerprint, the duckdb version (its hash() places rows into partitions) and FORMAT.
    `tables` are further inputs read by key (join's table, the captions): the output folder may
    not be, hold or lie inside any of them either."""
    fp = rundir.fingerprint(inp, [f.path for f in files]) if _is_folder(inp) else fingerprint_files(files)
    return RunDir.open(out, step, rundir.identity(cfg, fp, duckdb=duckdb.__version__, format=FORMAT, **extra),
                       inputs=[inp, *tables])


def _is_folder(inp: str) -> bool:
    return not any(ch in str(inp) for ch in "*?[") and storage.path(inp).is_dir()


def fingerprint_files(files: list[InputFile]) -> dict[str, Any]:
    """core.rundir.files_fingerprint from the sizes already read (no second stat per file)."""
    import hashlib

    items = sorted((f.path, f.size) for f in files)
    digest = hashlib.sha256("\n".join(f"{p}\t{n}" for p, n in items).encode()).hexdigest()
    return {"files": len(items), "bytes": sum(n for _, n in items), "digest": digest[:16]}


def attempt() -> str:
    """A new id for one attempt of a task (names its outputs on an object store)."""
    return uuid.uuid4().hex[:8]


def output(out: AnyPath, rel: str, attempt_id: str) -> AnyPath:
    """Where an attempt of a task writes output `rel` (a path relative to the step folder)."""
    return storage.attempt_path(out / rel, attempt_id)


def rel(out: AnyPath, path: AnyPath) -> str:
    """`path` relative to the step folder `out`, as markers and `_stats.json` name files."""
    return str(path)[len(str(out)) + 1:]


def staged_dir(out: AnyPath, upstream: RunDir, step: str, cfg: Any) -> AnyPath:
    """Where a previous step's tasks stage step `step`'s part outputs (inside its output folder,
    so adopting them is a rename or a server-side copy). Named by the upstream run's identity
    and this step's settings: a rerun with other settings or inputs never adopts them."""
    digest = config_hash({"upstream": upstream.hash, "step": step, "settings": settings(cfg)})
    return out / f"_staged-{digest[:16]}"


def clean_staged(out: AnyPath, keep: AnyPath | None = None) -> None:
    """Remove staged folders (all but `keep`) of an output folder."""
    for p in out.iterdir() if out.is_dir() else ():
        if p.name.startswith("_staged-") and p != keep:
            storage.rmtree(p)


def stage_done(staged: AnyPath, task: str, source: str, info: dict[str, Any]) -> None:
    """Record, after its files, that `task`'s outputs (info["files"], relative to the folder)
    for input `source` are staged, with the marker info the task returns."""
    atomic.write_json(staged / "_done" / f"{task}.json", {"source": source, "info": info})


def adopt_staged(rd: RunDir, sources: dict[str, str], staged: AnyPath | None) -> int:
    """Move staged outputs of tasks (task name -> its input path) into `rd` and mark those
    tasks done; returns how many. Safe to repeat after a crash: a file already moved is found
    in place (its content is what the task writes), and a task missing any file, or staged for
    another input, is left to run normally."""
    adopted = 0
    for name, source in sources.items():
        if staged is None or rd.is_done(name):
            continue
        manifest = staged / "_done" / f"{name}.json"
        try:
            entry = json.loads(manifest.read_text())
        except FileNotFoundError:
            continue
        if entry["source"] != source:
            continue
        files = entry["info"].get("files", [])
        for f in files:
            if (staged / f).exists():
                storage.move(staged / f, rd.path / f)
        if all((rd.path / f).exists() for f in files):
            rd.mark_done(name, entry["info"])
            adopted += 1
    return adopted


# Parquet as every metadata step writes it. A column with over 1,000 distinct values per row
# group (URL, TEXT, hash) skips the dictionary duckdb would otherwise build and then drop;
# few-valued ones (LICENSE, NSFW, the ledger's state) keep it. Same file size on LAION-like
# rows, 17% less CPU per write (0.56 -> 0.49 s per 1.25M rows, medians of 5).
PARQUET = "FORMAT parquet, DICTIONARY_SIZE_LIMIT 1000"


# Ledger parts: parquet v2 pages (delta-encoded row indexes): 0.17 -> 0.09 CPU s and 20 -> 15 MB
# per 1.14M ledger rows; duckdb and pyarrow read them as any parquet (data parts stay v1, where
# v2 gained nothing, for the widest choice of readers).
LEDGER_PARQUET = PARQUET + ", PARQUET_VERSION V2"


def copy_to(con: duckdb.DuckDBPyConnection, select: str, path: AnyPath, options: str = PARQUET) -> None:
    """`COPY (select) TO path` through a local temp name, then a rename or one upload."""
    with atomic.atomic_path(path) as tmp:
        con.execute(f"COPY ({select}) TO {sql_str(str(tmp))} ({options})")


def enum_sql(values: Sequence[str]) -> str:
    """An inline duckdb ENUM type of `values` (in first-seen order, duplicates dropped)."""
    return "ENUM(" + ", ".join(sql_str(v) for v in dict.fromkeys(values)) + ")"


def ledger_select(step: str, source: str, row: str, key: str, state: str, reason: str = "NULL",
                  value: str = "NULL", ref: str = "NULL", *, key_type: str = "VARCHAR",
                  sources: Sequence[str] | None = None, reasons: Sequence[str] | None = None) -> str:
    """The SELECT list of a ledger part; arguments are SQL expressions except `step`.

    `key` and `ref` are cast to `key_type`: a metadata step keeps LAION's `hash` as the integer
    it is (writing it as text cost 0.17 CPU s per 1.25M rows). `step` and `state`, and
    `source` and `reason` when their possible values are given, are cast to ENUMs: the parquet
    column is a plain string either way, but duckdb then writes a dictionary index per row
    instead of hashing the same few strings row after row (0.38 -> 0.26 CPU s per 1.25M rows).
    A value outside its ENUM is a conversion error, never a silently wrong ledger."""
    exprs = (sql_str(step), source, row, key, state, reason, value, ref)
    types = {0: enum_sql([step]), 2: "BIGINT", 3: key_type, 4: enum_sql(ledger.STATES), 7: key_type}
    if sources:
        types[1] = enum_sql(sources)
    if reasons:
        types[5] = enum_sql(reasons)
    typed = [f"({e})::{types.get(i, 'VARCHAR')}" for i, e in enumerate(exprs)]
    return ", ".join(f"{e} AS {c}" for e, c in zip(typed, LEDGER_COLUMNS))


def ledger_path(out: AnyPath, task: str, attempt_id: str) -> AnyPath:
    """Where an attempt of `task` writes its ledger part: OUT/_ledger/<task>.parquet."""
    return output(out, f"{ledger.LEDGER_DIR}/{task}.parquet", attempt_id)


def write_ledger(con: duckdb.DuckDBPyConnection, select: str, path: AnyPath) -> None:
    """A ledger part from a SELECT of LEDGER_COLUMNS (see ledger_select)."""
    copy_to(con, select, path, LEDGER_PARQUET)


def finish(out: AnyPath, step: str, files: list[InputFile], infos: Sequence[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    """Complete a step: the data and ledger parts are the files its tasks' markers name
    (`infos`); any other data file in the folder (an abandoned attempt) is deleted; the ledger
    is reconciled with the input row count; `_stats.json` is written, naming the parts, and
    printed."""
    named = [n for info in infos for n in info.get("files", ())]
    parts = sorted(n for n in named if "/" not in n and n.endswith(".parquet"))
    ledgers = sorted(n for n in named if n.startswith(ledger.LEDGER_DIR + "/"))
    remove_unnamed(out, set(named))
    counts = ledger.counts(out, [out / n for n in ledgers])
    stats = ledger.write_stats(out, step, sum(f.rows for f in files), counts, **extra, parts=parts, ledger=ledgers)
    ledger.print_counts(stats)
    return stats


def remove_unnamed(out: AnyPath, named: set[str]) -> int:
    """Delete data and ledger parts of `out` that no marker names; returns how many."""
    n = 0
    for pattern in ("*.parquet", f"{ledger.LEDGER_DIR}/*.parquet"):
        for p in out.glob(pattern):
            if rel(out, p) not in named and storage.is_data_name(p.name):
                p.unlink(missing_ok=True)
                n += 1
    return n

