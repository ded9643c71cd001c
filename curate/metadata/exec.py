"""Execution shared by the metadata steps: the run-folder identity of a step, atomic duckdb
COPYs, ledger parts written by duckdb, and the staging of a fused next step's outputs.

Tasks run through `core.units` (Ray tasks with completion markers, one failure policy): a
task writes its outputs to temp names and renames them, then the runner writes its marker;
a rerun after a crash redoes only unfinished tasks.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Sequence

import duckdb

from core import atomic, ledger, rundir
from core.config import config_hash, settings
from core.rundir import RunDir
from curate.metadata.io import InputFile, sql_str

# Ledger columns as SQL, in core.ledger.LEDGER_SCHEMA order and types.
LEDGER_COLUMNS = ("step", "source", "row", "key", "state", "reason", "value", "ref")


# What the metadata steps' tasks write, as a version: part of every run folder's identity, so
# a folder left mid-run by a version whose intermediate files or ledger types differ is refused
# with a clear message instead of being finished with mixed formats. Bump on such a change.
# 2: ledger key/ref keep LAION's hash type (int64), dedup's phase 2 lists the dropped rows.
# 3: identity = core.rundir.identity (settings + input fingerprint), units run by core.units.
FORMAT = 3


def open_run(out: str | Path, step: str, cfg: Any, inp: str, files: list[InputFile], **extra: Any) -> RunDir:
    """Open the output folder with everything that decides its content: settings, the input
    fingerprint, the duckdb version (its hash() places rows into buckets) and FORMAT."""
    fp = rundir.fingerprint(inp, [f.path for f in files]) if Path(inp).is_dir() else rundir.files_fingerprint(
        [f.path for f in files])
    return RunDir.open(out, step, rundir.identity(cfg, fp, duckdb=duckdb.__version__, format=FORMAT, **extra))


def staged_dir(out: str | Path, upstream: RunDir, step: str, cfg: Any) -> Path:
    """Where a previous step's tasks stage step `step`'s part outputs (inside its output folder,
    so adopting them is a rename). Named by the upstream run's identity and this step's
    settings: a rerun with other settings or inputs never adopts them."""
    digest = config_hash({"upstream": upstream.hash, "step": step, "settings": settings(cfg)})
    return Path(out) / f"_staged-{digest[:16]}"


def clean_staged(out: str | Path, keep: Path | None = None) -> None:
    """Remove staged folders (all but `keep`) of an output folder."""
    for p in Path(out).glob("_staged-*"):
        if p != keep:
            shutil.rmtree(p, ignore_errors=True)


def stage_done(staged: Path, task: str, source: str, info: dict[str, Any], files: list[str]) -> None:
    """Record, after its files, that `task`'s outputs (paths relative to the folder) for input
    `source` are staged, with the marker info the task returns."""
    entry = {"source": source, "info": info, "files": files}
    atomic.write_json(staged / "_done" / f"{task}.json", entry)


def adopt_staged(rd: RunDir, sources: dict[str, str], staged: Path | None) -> int:
    """Rename staged outputs of tasks (task name -> its input path) into `rd` and mark those
    tasks done; returns how many. Safe to repeat after a crash: a file already renamed is found
    in place (its content is what the task writes), and a task missing any file, or staged for
    another input, is left to run normally."""
    adopted = 0
    for name, source in sources.items():
        manifest = (staged or rd.path) / "_done" / f"{name}.json"
        if staged is None or rd.is_done(name) or not manifest.exists():
            continue
        entry = json.loads(manifest.read_text())
        if entry["source"] != source:
            continue
        for rel in entry["files"]:
            if (staged / rel).exists():
                (rd.path / rel).parent.mkdir(parents=True, exist_ok=True)
                os.replace(staged / rel, rd.path / rel)
        if all((rd.path / rel).exists() for rel in entry["files"]):
            rd.mark_done(name, entry["info"])
            adopted += 1
    return adopted


# Parquet as every metadata step writes it. A column with over 1,000 distinct values per row
# group (URL, TEXT, hash) skips the dictionary duckdb would otherwise build and then drop;
# few-valued ones (LICENSE, NSFW, the ledger's state) keep it. Same file size on LAION-like
# rows, 17% less CPU per write (0.56 -> 0.49 s per 1.25M rows, medians of 5).
PARQUET = "FORMAT parquet, DICTIONARY_SIZE_LIMIT 1000"


def copy_to(con: duckdb.DuckDBPyConnection, select: str, path: Path, options: str = PARQUET) -> None:
    """`COPY (select) TO path` through a temp name and a rename."""
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


def write_ledger(con: duckdb.DuckDBPyConnection, select: str, out: Path, task: str) -> None:
    """Write a ledger part OUT/_ledger/<task>.parquet from a SELECT of LEDGER_COLUMNS."""
    copy_to(con, select, Path(out) / ledger.LEDGER_DIR / f"{task}.parquet")


def count(con: duckdb.DuckDBPyConnection, path: Path) -> int:
    return int(con.execute(f"SELECT count(*) FROM read_parquet({sql_str(str(path))})").fetchone()[0])


def clean_temp_dirs(folder: Path) -> None:
    """Remove `_tmp.*` folders a killed run left (core.rundir removes temp files only)."""
    if folder.is_dir():
        for p in folder.glob("_tmp.*"):
            shutil.rmtree(p, ignore_errors=True)


def finish(out: Path, step: str, files: list[InputFile], **extra: Any) -> dict[str, Any]:
    """Reconcile the ledger with the input row count, write and print `_stats.json`."""
    stats = ledger.write_stats(out, step, sum(f.rows for f in files), ledger.counts(out), **extra)
    ledger.print_counts(stats)
    return stats
