"""pretokenize with s3:// input and output, and the trainer's staging of those code shards:
shards streamed from S3, code shards uploaded under attempt-unique names that the manifest
names, the staged copy checked against the manifest and reused by a second run."""
from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest

from core import atomic, codeshard, storage
from core.codeshard import CodeDataset, CodeShardError
from pretokenize.run import PretokenizeConfig, run
from train.data import DataConfig, open_dataset

RES = 32


def cfg_for(vq_dir, **kw) -> PretokenizeConfig:
    return PretokenizeConfig(**(dict(res=RES, vq=str(vq_dir), batch_size=4, executor="local", cpus_per_actor=1,
                                      decode_threads=2) | kw))


@pytest.fixture(scope="module")
def codes_on_s3(s3_server, shards, vq_dir, tmp_path_factory):
    remote = f"{s3_server}/pretok-{tmp_path_factory.mktemp('id').name}"
    for p in sorted(shards.iterdir()):
        storage.upload(p, storage.path(f"{remote}/shards") / p.name)
    atomic.write_parquet(f"{remote}/keep.parquet", pa.table({"key": ["000000000", "000000001", "000010004"],
                                                             "shard": ["00000.tar", "00000.tar", "00001.tar"]}))
    local = tmp_path_factory.mktemp("codes") / "codes"
    run(cfg_for(vq_dir, keep_list=f"{remote}/keep.parquet"), f"{remote}/shards", str(local))
    run(cfg_for(vq_dir, keep_list=f"{remote}/keep.parquet"), f"{remote}/shards", f"{remote}/codes")
    stale = storage.path(f"{remote}/codes") / "00000.deadbeef0000.arrow"  # an abandoned attempt's upload (a
    atomic.write_bytes(stale, b"half of something")                     # killed rerun's), beside the committed one
    stats = run(cfg_for(vq_dir, keep_list=f"{remote}/keep.parquet"), f"{remote}/shards", f"{remote}/codes")
    return remote, local, stats, stale


def test_pretokenize_s3_to_s3_equals_local(codes_on_s3) -> None:
    remote, local, stats, stale = codes_on_s3
    manifest = codeshard.read_manifest(f"{remote}/codes")
    names = [s.name for s in manifest.shards]
    assert len(names) == 2 and all(n.count(".") == 2 and n.endswith(".arrow") for n in names)  # <stem>.<attempt>.arrow
    assert not stale.exists()  # no manifest names it: removed when the step completed
    assert stats["kept"] == 3 and stats["filtered"] == 11
    want = CodeDataset(local)
    for info, shard in zip(manifest.shards, want.shards):
        data = storage.path(f"{remote}/codes/{info.name}").read_bytes()
        assert len(data) == info.bytes and codeshard.file_sha256(f"{remote}/codes/{info.name}") == info.sha256
        assert info.rows == len(shard)


def test_trainer_stages_checked_shards_once(codes_on_s3, tmp_path, monkeypatch) -> None:
    remote, local, _, _ = codes_on_s3
    cfg = DataConfig(path=f"{remote}/codes", cache=str(tmp_path / "cache"))
    ds = open_dataset(cfg)
    want = CodeDataset(local)
    assert ds.folder.parent == tmp_path / "cache" and len(ds) == len(want) == 3
    assert np.array_equal(ds.codes(np.arange(3)), want.codes(np.arange(3)))
    staged = json.loads((ds.folder / codeshard.STAGED).read_text())
    assert sorted(staged) == sorted(s.name for s in ds.manifest.shards)
    # A second run reuses the checked copy: nothing is fetched.
    monkeypatch.setattr(codeshard, "_fetch_checked", lambda *a: pytest.fail("fetched again"))
    assert len(open_dataset(cfg)) == 3
    monkeypatch.undo()
    # A local copy changed behind our back is fetched again; an object that is not what the
    # manifest says is refused by name.
    victim = ds.folder / ds.manifest.shards[0].name
    victim.write_bytes(victim.read_bytes()[:-8])
    assert len(open_dataset(cfg)) == 3 and victim.stat().st_size == ds.manifest.shards[0].bytes
    atomic.write_bytes(f"{remote}/codes/{ds.manifest.shards[1].name}", b"not the codes")
    (ds.folder / ds.manifest.shards[1].name).unlink()
    with pytest.raises(CodeShardError, match="another file than pretokenize recorded"):
        open_dataset(cfg)
