"""neardup and score with s3:// input and output (moto's S3 server on loopback, found through
AWS_ENDPOINT_URL only): the same ledger, keep list and groups as on a local disk; shards are
streamed from S3; readers take the shards and parts the records name; nothing is written to
the working folder."""
from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from core import keeplist, ledger, rundir, storage
from core.imageshard import iter_shard, list_shards
from curate.images import neardup, score
from curate.images.neardup import NearDupConfig
from curate.images.score import ScoreConfig
from image_shards_fixture import neardup_shards

CFG = dict(distance=4, placeholder_hosts=3, write_shards=True)


def upload_folder(local, remote: str) -> None:
    for p in sorted(local.iterdir()):
        storage.upload(p, storage.path(remote) / p.name)


def table(path) -> pa.Table:
    return pq.read_table(pa.BufferReader(storage.path(path).read_bytes()))


def ledger_rows(folder) -> list[dict]:
    parts = [table(p) for p in ledger.parts(folder)]
    return pa.concat_tables(parts).sort_by([("source", "ascending"), ("row", "ascending")]).to_pylist()


@pytest.fixture(scope="module")
def local_and_s3(tmp_path_factory, s3_server, ray_local):
    shards = neardup_shards(tmp_path_factory.mktemp("nd") / "shards")
    local = tmp_path_factory.mktemp("nd_out") / "out"
    neardup.run(NearDupConfig(**CFG), str(shards), str(local))
    remote = f"{s3_server}/images-{tmp_path_factory.mktemp('id').name}"
    upload_folder(shards, f"{remote}/shards")
    stats = neardup.run(NearDupConfig(**CFG), f"{remote}/shards", f"{remote}/nd")
    return local, remote, stats


def test_neardup_on_s3_equals_the_local_run(local_and_s3, tmp_path, monkeypatch) -> None:
    local, remote, stats = local_and_s3
    out = storage.path(f"{remote}/nd")
    assert ledger_rows(out) == ledger_rows(local)
    assert table(out / "keep.parquet").equals(pq.read_table(local / "keep.parquet"))
    assert table(out / "_groups.parquet").equals(pq.read_table(local / "_groups.parquet"))
    assert stats["parts"] == ["00000.tar", "00001.tar"] and rundir.check_finished(out)["complete"]
    assert not list(out.glob("_grouping/**/*"))  # the grouping's intermediate files are gone
    kept = keeplist.keys_for(out / "keep.parquet", "00001")

    assert list_shards(out) == [out / "00000.tar", out / "00001.tar"]  # from the completion record
    assert {s.key for s in iter_shard(out / "00001.tar")} == kept == {"000010000", "000010005"}
    monkeypatch.chdir(tmp_path)  # a rerun on S3 redoes nothing and writes nothing here
    assert neardup.run(NearDupConfig(**CFG), f"{remote}/shards", f"{remote}/nd") == stats
    assert list(tmp_path.iterdir()) == []


def test_score_reads_shards_and_a_keep_list_on_s3_and_writes_to_s3(local_and_s3) -> None:
    _, remote, _ = local_and_s3
    cfg = ScoreConfig(nsfw=True, executor="local", batch_size=4, keep_list=f"{remote}/nd/keep.parquet")
    stats = score.run(cfg, f"{remote}/shards", f"{remote}/scored")
    out = storage.path(f"{remote}/scored")
    assert stats["parts"] == ["00000.parquet", "00001.parquet"] and stats["kept"] == 4 and stats["rows_in"] == 4
    rows = pa.concat_tables([table(out / n) for n in stats["parts"]])
    assert sorted(rows["key"].to_pylist()) == ["000000001", "000000005", "000010000", "000010005"]
    assert all(0 <= p <= 1 for p in rows["punsafe"].to_pylist())
    marker = json.loads((out / "_done" / "score.00001.json").read_text())
    assert marker["files"] == ["00001.parquet", "_ledger/00001.parquet"]
    assert marker["input"]["keep_list"] is not None  # the keep list's record is part of each unit's input
