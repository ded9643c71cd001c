"""Adopting finished shards: verify, move into the output folder, ledger, mark done.

img2dataset writes each shard into a local staging folder of this attempt (<staging>/<attempt>/,
see DownloadConfig.staging) and its `_stats.json` last. As soon as that file appears the shard
is verified (`curate.download.verify`) and, if whole, its three files are committed to the
output (`core.atomic.publish`: a rename on the same disk, an upload to an object store), the
ledger parts of the original shards it touches are rebuilt, and its marker, naming the files,
is written last: the same protocol on a disk and on an object store, and a kill at any moment
loses at most the shards still being downloaded (a half-committed shard has no marker and is
redone). Only the driver holding the output's lock or lease commits, so shard files keep their
plain names. A rerun first adopts the verified shards earlier attempts left in staging (a kill
between img2dataset finishing a shard and its adoption), then fetches only the shards no
verified copy holds.
"""
from __future__ import annotations

import shutil
from pathlib import Path

from core import atomic, ledger
from core.rundir import RunDir
from curate.download import ledger as download_ledger
from curate.download.plan import ShardEntry, ShardPlan
from curate.download.verify import ShardCheck, shard_files, verify_shard

STAGING = "_staging"


def adopt(rd: RunDir, plan: ShardPlan, entry: ShardEntry, staging: Path, caption: bool) -> ShardCheck:
    """Verify a staged shard; if good, move it to the top level, rebuild ledgers, mark done."""
    name = plan.name(entry.id)
    check = verify_shard(staging, name, entry.rows, caption=caption)
    if not check.ok:
        return check
    sizes = {f"{k}_bytes": p.stat().st_size for k, p in shard_files(staging, name).items()}
    for src in shard_files(staging, name).values():
        atomic.publish(src, rd.path / src.name)  # the stats file last, as img2dataset wrote it
    children = plan.children()
    for origin in entry.retry_of or (entry.id,):
        write_ledger_part(rd, plan, origin, children.get(origin, []), extra_done={entry.id})
    rd.mark_done(name, {"rows": check.rows, "kept": check.kept, "retry_of": list(entry.retry_of) or None, **sizes,
                        "files": [p.name for p in shard_files(rd.path, name).values()]})
    return check


def adopt_finished(rd: RunDir, plan: ShardPlan, entries: list[ShardEntry], staging: Path, caption: bool,
                   final: bool = False) -> list[ShardCheck]:
    """Adopt every shard of `entries` img2dataset has finished in `staging` (its _stats.json is
    there) and that is not done yet. While img2dataset runs (`final` False) a shard that does
    not verify is left for the next look (its stats file may be half written); at the end every
    unadopted shard is returned as a failed check."""
    failed = []
    for entry in entries:
        name = plan.name(entry.id)
        if rd.is_done(name):
            continue
        if not final and not shard_files(staging, name)["stats"].is_file():
            continue
        check = adopt(rd, plan, entry, staging, caption)
        if not check.ok and final:
            failed.append(check)
    return failed


def adopt_leftovers(rd: RunDir, plan: ShardPlan, caption: bool, root: Path) -> int:
    """Adopt the verified shards that earlier (killed) attempts left in the staging folder
    `root`, then remove those attempts; returns how many were adopted. The caller holds the
    folder's lock, so no worker of an earlier run is still writing there."""
    adopted = 0
    for attempt in sorted(p for p in root.glob("*") if p.is_dir()) if root.is_dir() else []:
        for entry in plan.shards:
            name = plan.name(entry.id)
            if not rd.is_done(name) and shard_files(attempt, name)["stats"].is_file():
                adopted += adopt(rd, plan, entry, attempt, caption).ok
        shutil.rmtree(attempt, ignore_errors=True)
    return adopted


def write_ledger_part(rd: RunDir, plan: ShardPlan, shard_id: int, children: list[int],
                      extra_done: set[int] = frozenset()) -> None:
    """Rebuild the ledger part of original shard `shard_id` from its parquet and its finished retries."""
    entry = plan.shards[shard_id]
    retries = [rd.path / f"{plan.name(c)}.parquet" for c in children
               if c in extra_done or rd.is_done(plan.name(c))]
    own = rd.path / f"{plan.name(shard_id)}.parquet"
    ledger.write(rd.path, plan.name(shard_id), download_ledger.build_part(entry, own, retries))


def still_valid(rd: RunDir, name: str) -> bool:
    """A done shard whose files vanished or changed size since verification is redone."""
    info = rd.done_info(name)
    files = shard_files(rd.path, name)
    return all(p.is_file() and p.stat().st_size == info.get(f"{k}_bytes") for k, p in files.items())


def pending(rd: RunDir, plan: ShardPlan) -> list[ShardEntry]:
    """Shards not done (a done shard whose files changed loses its marker and is redone)."""
    out = []
    for e in plan.shards:
        name = plan.name(e.id)
        if rd.is_done(name) and not still_valid(rd, name):
            rd.marker(name).unlink()
        if not rd.is_done(name):
            out.append(e)
    return out


def rebuild_missing_ledgers(rd: RunDir, plan: ShardPlan) -> None:
    """A ledger part lost after its shard was done is rebuilt from the shard parquets."""
    children = plan.children()
    for e in plan.originals():
        name = plan.name(e.id)
        if rd.is_done(name) and not (rd.path / ledger.LEDGER_DIR / f"{name}.parquet").is_file():
            write_ledger_part(rd, plan, e.id, children.get(e.id, []))
