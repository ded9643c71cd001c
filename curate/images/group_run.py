"""Near-dup grouping at scale, from the driver: plan the job, run its tasks in order, clean up.

The driver holds sizes and names only (per shard, per task), never a value per image: every
image's data moves between the tasks of `curate.images.group_tasks` through files under
OUT/_grouping/ (local or on an object store). Each phase is a list of `core.units` units, so
a killed run resumes at the first unfinished unit; every unit's marker records the job's
identity (the hash parts it reads and the layout), so a rerun with other hashes or another
layout redoes the job instead of mixing files. When the job is done its files and the
markers of its intermediate units are removed; the last unit's marker stays and a rerun with
the same identity skips the whole job.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import math
import time
from dataclasses import asdict, dataclass
from typing import Any

from core import keeplist, ledger, storage
from core.rundir import RunDir
from core.units import Unit, is_done, run_units
from curate.images import group_tasks as gt
from curate.images import mih

SCRATCH = "_grouping"
PREFIX = "group"


@dataclass(frozen=True)
class HashPart:
    """One shard's hash part, as the hashing unit left it."""

    path: str  # OUT/_hashes/<stem>.parquet (local path or URI)
    shard: str  # the tar's file name, e.g. "00012.tar"
    rows: int  # rows in the part
    input: Any  # the hashing unit's input identity (the shard's name, size, time)


def plan(root: str, parts: list[HashPart], distance: int, placeholder_hosts: int, bands: int | None,
         rows_per_task: int) -> tuple[gt.Layout, list[list[int]]]:
    """The job's layout and its blocks of shards (consecutive shards of <= rows_per_task rows)."""
    n = sum(p.rows for p in parts)
    blocks: list[list[int]] = []
    firsts, first, filled = [], 0, rows_per_task
    for i, p in enumerate(parts):
        if filled + p.rows > rows_per_task and (not blocks or blocks[-1]):
            blocks.append([])
            firsts.append(first)
            filled = 0
        blocks[-1].append(i)
        filled += p.rows
        first += p.rows
    bands = bands or mih.choose_bands(max(n, 2), distance)
    narrowest = mih.HASH_BITS // bands
    per_band = min(narrowest, max(0, math.ceil(math.log2(max(1.0, n / rows_per_task)))))
    tasks = max(1, math.ceil(n / rows_per_task))
    layout = gt.Layout(
        root=root, rows=n, buckets=tasks, distance=distance, placeholder_hosts=placeholder_hosts, bands=bands,
        band_parts=1 << per_band, tables=tuple(tuple(t) for t in mih.assign_tables(mih.HASH_BITS, bands, distance)),
        blocks=tuple(firsts) + (n,), group_parts=tasks)
    return layout, blocks


def job_identity(layout: gt.Layout, parts: list[HashPart]) -> str:
    """Digest of what the job's files depend on: every hash part and the layout."""
    doc = {"layout": asdict(layout), "parts": [(p.shard, p.rows, p.input) for p in parts]}
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()[:16]


def run(rd: RunDir, parts: list[HashPart], distance: int, placeholder_hosts: int, bands: int | None,
        rows_per_task: int) -> dict[str, Any]:
    """Group every hash row of `parts`; writes the ledger parts, keep.parquet and _groups.parquet
    of rd. Returns the last unit's info (kept rows, group count) with, when the job ran now,
    the largest task's peak RSS, each phase's largest task peak RSS and its wall seconds."""
    layout, blocks = plan(str(rd.path / SCRATCH), parts, distance, placeholder_hosts, bands, rows_per_task)
    job = job_identity(layout, parts)
    # The job's lasting outputs: a rerun redoes the job if any of them was lost.
    lasting = ("keep.parquet", "_groups.parquet",
               *(f"{ledger.LEDGER_DIR}/{keeplist.shard_id(p.shard)}.parquet" for p in parts))
    last = Unit(f"{PREFIX}.finish", (layout, len(blocks), str(rd.path)), input=job, outputs=lasting)
    if is_done(rd, last):
        return rd.done_info(last.name)
    phases = _phases(rd, layout, parts, blocks, job) + [("keep list and groups", gt.finish, [last])]
    peaks, seconds = {}, {}
    for label, fn, units in phases:
        t0 = time.perf_counter()
        infos = run_units(rd, units, fn, f"neardup: grouping, {label}")
        seconds[label] = round(time.perf_counter() - t0, 2)
        peaks[label] = max(float(i.get("peak_rss_mb", 0)) for i in infos)
    storage.rmtree(storage.path(layout.root))
    for _, _, units in phases[:-1]:
        for u in units:
            rd.marker(u.name).unlink(missing_ok=True)
    return {**infos[0], "peak_task_rss_mb": max(peaks.values()), "phase_peak_rss_mb": peaks, "phase_seconds": seconds,
            "tasks": sum(len(u) for _, _, u in phases)}


def _phases(rd: RunDir, layout: gt.Layout, parts: list[HashPart], blocks: list[list[int]], job: str
            ) -> list[tuple[str, Any, list[Unit]]]:
    """Every phase before the last, in order: (label, unit function, units)."""
    p, k = layout.buckets, len(blocks)
    first = list(itertools.accumulate((pt.rows for pt in parts), initial=0))  # first gid of each shard
    scatter = [Unit(f"{PREFIX}.scatter.{b:05d}", (layout, b, [(parts[i].path, i, first[i]) for i in blk]), input=job)
               for b, blk in enumerate(blocks)]
    host_files = [layout.path("host", b) for b in range(k)]
    sha_files = [layout.path("sha", b) for b in range(k)]
    placeholder_files = [layout.path("placeholders", b) for b in range(p)] if layout.placeholder_hosts > 0 else []
    mih_parts = (layout.distance + 1) * layout.band_parts
    names = [pt.shard for pt in parts]
    phases: list[tuple[str, Any, list[Unit]]] = [("scatter", gt.scatter, scatter)]
    if layout.placeholder_hosts > 0:
        phases.append(("placeholders", gt.placeholders,
                       [Unit(f"{PREFIX}.placeholders.{b:05d}", (layout, b, host_files), input=job) for b in range(p)]))
    phases += [
        ("sha256", gt.shas, [Unit(f"{PREFIX}.shas.{b:05d}", (layout, b, sha_files, placeholder_files), input=job)
                             for b in range(p)]),
        ("near pairs", gt.pairs, [Unit(f"{PREFIX}.pairs.{m:05d}", (layout, m, [layout.path("reps", b) for b in range(p)]),
                                       input=job) for m in range(mih_parts)]),
        ("components", gt.components, [Unit(f"{PREFIX}.components", (layout, [layout.path("edges", m) for m in range(mih_parts)],
                                                                      [layout.path("groups", b) for b in range(p)]), input=job)]),
        ("outcomes", gt.resolve, [Unit(f"{PREFIX}.resolve.{b:05d}", (layout, b), input=job) for b in range(p)]),
        ("ledgers", gt.ledgers, [Unit(f"{PREFIX}.ledgers.{b:05d}",
                                      (layout, b, [(parts[i].path, parts[i].shard, first[i]) for i in blk], str(rd.path)),
                                      input=job) for b, blk in enumerate(blocks)]),
        ("groups", gt.groups, [Unit(f"{PREFIX}.groups.{g:05d}", (layout, g, names), input=job)
                               for g in range(layout.group_parts)]),
    ]
    return phases
