"""Execution shared by the metadata steps: Ray tasks with completion markers, atomic duckdb
COPYs, ledger parts written by duckdb, and the run-folder identity of a step.

A task runs in a Ray worker: it writes its outputs to temp names, renames them, then writes
its marker (`RunDir.mark_done`); the driver skips tasks whose marker exists, so a rerun
after a crash redoes only unfinished work.
"""
from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path
from typing import Any, Callable, Sequence

import duckdb

from core import atomic, ledger
from core.config import to_dict
from core.progress import ray_results
from core.ray_util import init_ray
from core.rundir import RunDir
from curate.metadata_io import InputFile, MetadataError, fingerprint, sql_str

# Config fields that change how fast a step runs, never what it writes: left out of the
# run folder's identity so a rerun with more memory or threads may resume the same folder.
EXEC_FIELDS = ("threads", "memory")

# Ledger columns as SQL, in core.ledger.LEDGER_SCHEMA order and types.
LEDGER_COLUMNS = ("step", "source", "row", "key", "state", "reason", "value", "ref")

Task = tuple[str, Callable[..., dict], tuple]  # (marker name, function, arguments)


def open_run(out: str | Path, step: str, cfg: Any, files: list[InputFile], **extra: Any) -> RunDir:
    """Open the output folder with everything that decides its content: settings, the input
    fingerprint and the duckdb version (its hash() places rows into buckets)."""
    settings = {k: v for k, v in to_dict(cfg).items() if k not in EXEC_FIELDS}
    identity = {"settings": settings, "input": fingerprint(files), "duckdb": duckdb.__version__, **extra}
    return RunDir.open(out, step, identity)


def exec_config(cfg: Any) -> dict[str, Any]:
    """The execution knobs of a step config (threads, memory)."""
    return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.name in EXEC_FIELDS}


def _run_one(rd: RunDir, name: str, fn: Callable[..., dict], args: tuple) -> dict:
    try:
        info = fn(*args)
    except duckdb.Error as exc:  # e.g. a corrupt page past a valid footer: duckdb names the file
        raise MetadataError(f"task {name} of {rd.path}: {exc}") from exc
    rd.mark_done(name, info)  # last: the task's outputs are already renamed into place
    return info


_REMOTE: Any = None


def run_tasks(rd: RunDir, tasks: Sequence[Task], description: str, cpus: int = 1) -> list[dict]:
    """Run every task whose marker is missing as a Ray task with `cpus` CPUs; returns each
    task's marker info (done earlier or now), in the order of `tasks`."""
    global _REMOTE
    todo = [t for t in tasks if not rd.is_done(t[0])]
    if todo:
        init_ray()  # reuses the caller's Ray (CLI, pipeline, tests); starts a local one otherwise
        import ray

        _REMOTE = _REMOTE or ray.remote(_run_one)
        refs = [_REMOTE.options(num_cpus=cpus).remote(rd, *t) for t in todo]
        skipped = len(tasks) - len(todo)
        ray_results(refs, f"{description}" + (f" ({skipped} done before)" if skipped else ""))
    return [rd.done_info(t[0]) for t in tasks]


def copy_to(con: duckdb.DuckDBPyConnection, select: str, path: Path, options: str = "FORMAT parquet") -> None:
    """`COPY (select) TO path` through a temp name and a rename."""
    with atomic.atomic_path(path) as tmp:
        con.execute(f"COPY ({select}) TO {sql_str(str(tmp))} ({options})")


def ledger_select(step: str, source: str, row: str, key: str, state: str, reason: str = "NULL",
                  value: str = "NULL", ref: str = "NULL") -> str:
    """The SELECT list of a ledger part; arguments are SQL expressions except `step`."""
    exprs = (sql_str(step), source, f"({row})::BIGINT", key, state, reason, value, ref)
    typed = [e if i == 2 else f"({e})::VARCHAR" for i, e in enumerate(exprs)]
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
