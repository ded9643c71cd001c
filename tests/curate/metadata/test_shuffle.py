"""curate.metadata.shuffle: one bundle per map task, blobs read back by byte range, counts
checked at every hand-over; a lost or short blob is an error, never an empty partition."""
from __future__ import annotations

import duckdb
import pytest

from core.errors import StepIncomplete
from curate.metadata import dedup, shuffle, synth


def _maps(tmp_path, n_maps=3, parts=5):
    con = duckdb.connect()
    indexes = []
    for m in range(n_maps):
        con.execute(f"CREATE OR REPLACE TABLE t AS SELECT range AS x, (range % {parts})::INTEGER AS p FROM range({m * 100}, {m * 100 + 40 + m})")
        indexes.append(shuffle.write(con, "SELECT * FROM t WHERE p <> 3", "p", tmp_path / f"m{m}.bundle", order="x"))
    return indexes, shuffle.plan(tmp_path, indexes, parts)


def test_round_trip_one_file_per_map(tmp_path):
    indexes, plan = _maps(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m0.bundle", "m1.bundle", "m2.bundle"]
    assert indexes[0]["parts"] == [0, 1, 2, 4] and sum(indexes[1]["rows"]) == 41 - 8
    for pieces in plan:
        table = shuffle.read(pieces, source="src")
        if pieces.part == 3:
            assert table is None and pieces.rows == 0
            continue
        xs = table.column("x").to_pylist()
        assert all(x % 5 == pieces.part for x in xs) and xs == sorted(xs)  # map order, then row order
        assert sorted(set(table.column("src").to_pylist())) == [0, 1, 2] and table.num_rows == pieces.rows


def test_a_lost_or_short_blob_is_an_error(tmp_path):
    indexes, plan = _maps(tmp_path)
    short = shuffle.Pieces(1, plan[1].paths, plan[1].table.copy())
    short.table[1, 3] += 1  # the map recorded one row more than the blob holds
    with pytest.raises(shuffle.ShuffleError, match="holds 8 rows of partition .* recorded 9 rows"):
        shuffle.read(short)
    (tmp_path / "m2.bundle").unlink()
    with pytest.raises(shuffle.ShuffleError, match="m2.bundle is missing"):
        shuffle.read(plan[0])


def test_dedup_with_a_lost_bucket_file_stops_instead_of_keeping_everything(ray_local, tmp_path, monkeypatch):
    synth.run(synth.SynthConfig(rows=2000, files=2, dup_rate=0.3, seed=1), tmp_path / "in")
    real = shuffle.plan

    def plan_then_lose_one(folder, indexes, parts):
        pieces = real(folder, indexes, parts)
        if "p1-" in indexes[0]["bundle"]:
            (folder / indexes[0]["bundle"]).unlink()  # a node's disk lost phase 1's first bundle
        return pieces

    monkeypatch.setattr(shuffle, "plan", plan_then_lose_one)
    with pytest.raises(StepIncomplete, match="p1-00000.bundle is missing"):
        dedup.run(dedup.DedupConfig(buckets=3), str(tmp_path / "in"), str(tmp_path / "out"))
    assert not (tmp_path / "out" / "_stats.json").exists() and not list((tmp_path / "out").glob("part-*.parquet"))


def test_files_created_are_o_tasks(ray_local, tmp_path):
    # 4 files x 40 buckets: the old layout made 160 bucket files in phase 1; now one per task.
    synth.run(synth.SynthConfig(rows=4000, files=4, seed=1), tmp_path / "in")
    dedup.run(dedup.DedupConfig(buckets=40), str(tmp_path / "in"), str(tmp_path / "out"))
    out = tmp_path / "out"
    files = [p for p in out.rglob("*") if p.is_file()]
    tasks = len(list((out / "_done").glob("*.json")))
    assert tasks == 4 + 40 + 4
    assert len(files) <= 2 * tasks + 4  # markers, ledger parts, data parts, _config/_stats/_lock
