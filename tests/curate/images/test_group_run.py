"""Near-dup grouping as Ray tasks (curate.images.group_run) equals the single-pass reference
(grouping.decide + outputs) on generated hash rows with every rule's hard cases, split into
many buckets, MIH ranges and blocks; and it keeps to its file and driver contracts."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from core import atomic, keeplist
from core.rundir import RunDir
from curate.images import group_run, grouping, outputs

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "bench"))
import scale_neardup as bench  # noqa: E402  (the bench's generator: the same rows at 3k and at 20M)


def hash_parts(folder: Path, shards: int, rows: int, d: int) -> list[group_run.HashPart]:
    parts = []
    for s in range(shards):
        n = rows + 37 * s  # uneven shards
        table = bench.synthetic_part(s, n, shards * rows, d, dishonest=0.02, dup_keys=0.05, placeholders=0.03,
                                     failures=0.1)
        atomic.write_parquet(folder / f"{s:05d}.parquet", table)
        parts.append(group_run.HashPart(str(folder / f"{s:05d}.parquet"), f"{s:05d}.tar", n, {"s": s}))
    return parts


def single_pass(parts: list[group_run.HashPart], out: Path, d: int, hosts: int) -> None:
    table = pa.concat_tables([pq.read_table(p.path) for p in parts])
    dec = grouping.decide(table, d, hosts)
    keeplist.write(out / "keep.parquet", outputs.keep_table(table, dec))
    atomic.write_parquet(out / "_groups.parquet", outputs.groups_table(table, dec))
    outputs.write_ledger(out, table, dec)


@pytest.mark.parametrize("d,hosts,bands", [(4, 3, None), (2, 0, 5)])
def test_tasks_equal_the_single_pass(tmp_path, ray_local, d, hosts, bands) -> None:
    parts = hash_parts(tmp_path / "hashes", 6, 500, d)
    rd = RunDir.open(tmp_path / "tasks", "neardup", {"t": d})
    info = group_run.run(rd, parts, d, hosts, bands, rows_per_task=400)
    layout, blocks = group_run.plan("x", parts, d, hosts, bands, 400)
    assert layout.buckets == 9 and layout.band_parts == 16 and len(blocks) == 6  # really split
    (tmp_path / "single").mkdir()
    single_pass(parts, tmp_path / "single", d, hosts)
    assert bench.same_outputs(str(tmp_path / "tasks"), str(tmp_path / "single"))
    led = pq.read_table(tmp_path / "tasks" / "_ledger")
    states = dict(zip(*np.unique(led["state"].to_numpy(zero_copy_only=False), return_counts=True)))
    assert states["duplicate"] > 300 and states["failed"] > 200 and (states.get("filtered", 0) > 20) == (hosts > 0)
    reasons = set(led["reason"].drop_null().to_pylist())
    assert {"sha256", "phash"} <= reasons
    assert info["groups"] == pq.read_metadata(tmp_path / "tasks" / "_groups.parquet").num_rows > 100
    # The job's files and its intermediate markers are gone; its last marker makes a rerun a no-op.
    assert not (tmp_path / "tasks" / group_run.SCRATCH).exists()
    assert [p.name for p in (tmp_path / "tasks" / "_done").iterdir()] == ["group.finish.json"]
    before = (tmp_path / "tasks" / "keep.parquet").stat().st_mtime_ns
    assert group_run.run(rd, parts, d, hosts, bands, rows_per_task=400)["groups"] == info["groups"]
    assert (tmp_path / "tasks" / "keep.parquet").stat().st_mtime_ns == before
    # Another layout is another job (its files would not match): it runs again, same result.
    group_run.run(rd, parts, d, hosts, bands, rows_per_task=1000)
    assert bench.same_outputs(str(tmp_path / "tasks"), str(tmp_path / "single"))


def test_task_peak_memory_is_reported(tmp_path, ray_local) -> None:
    parts = hash_parts(tmp_path / "hashes", 2, 300, 4)
    rd = RunDir.open(tmp_path / "tasks", "neardup", {"t": 1})
    info = group_run.run(rd, parts, 4, 3, None, rows_per_task=10_000)
    assert 10 < info["peak_task_rss_mb"] < 4000 and set(info["phase_seconds"]) >= {"scatter", "near pairs", "ledgers"}
