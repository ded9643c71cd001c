"""pretokenize.run / encode: codes equal diffusers' own, ledger states, keep list, damage,
resume, config guard, actor sizing. In-process executor here; the Ray path is in test_pretokenize_cli."""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from core import ledger
from core.codeshard import CodeDataset, read_manifest
from core.config import ConfigError
from core.imageshard import iter_shard
from core.rundir import ConfigMismatchError
from core.vq import VQError, load_vq, vq_info
from pretokenize import preprocess
from core.keeplist import shard_id
from pretokenize.encode import original_size
from pretokenize.run import PretokenizeConfig, plan_actors, run

RES = 32  # as in conftest: the tiny f4 VQ gives 8x8 grids


def cfg_for(vq_dir: Path, **kw) -> PretokenizeConfig:
    base = dict(res=RES, vq=str(vq_dir), batch_size=4, executor="local", cpus_per_actor=1, decode_threads=2)
    return PretokenizeConfig(**(base | kw))


def ledger_rows(out: Path) -> list[dict]:
    return pa.concat_tables([pq.read_table(p) for p in sorted((out / "_ledger").glob("*.parquet"))]).to_pylist()


@pytest.fixture(scope="module")
def encoded(tmp_path_factory, shards, vq_dir):
    out = tmp_path_factory.mktemp("codes") / "codes"
    stats = run(cfg_for(vq_dir), shards, out)
    return out, stats


def test_codes_equal_diffusers_vqmodel_called_directly(encoded, shards, vq_dir):
    out, _ = encoded
    ds = CodeDataset(out, tokenizer_sha256=vq_info(vq_dir).sha256, verify_checksums=True)
    vq = load_vq(vq_dir)
    by_key = {s.key: s for tar in sorted(shards.glob("*.tar")) for s in iter_shard(tar)}
    rows = [ds.row(i) for i in range(len(ds))]
    pixels = np.stack([preprocess.prepare(by_key[r["key"]].image, RES).pixels for r in rows])
    x = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255  # (N, 3, RES, RES) in [0, 1]
    direct = vq.quantize(vq.encode(x).latents)[2][2].reshape(len(rows), -1).numpy()
    ours = np.stack([r["codes"] for r in rows])
    assert (ours == direct).mean() >= 0.999
    assert len(np.unique(ours)) >= 8  # the comparison is not between constant grids


def test_manifest_and_columns(encoded, vq_dir):
    out, stats = encoded
    m = read_manifest(out)
    assert m.grid == (RES // 4, RES // 4) and m.resolution == RES and m.codebook_size == 64
    assert m.tokenizer.sha256 == vq_info(vq_dir).sha256 and m.tokenizer.downsample == 4
    assert [s.name for s in m.shards] == ["00000.arrow", "00001.arrow"] and m.num_rows == 13
    row = CodeDataset(out).row(0)
    assert row["key"] == "000000000" and row["caption"] == "caption 0/0"
    assert row["long_caption"] == "a long caption 0" and row["aesthetic"] == pytest.approx(5.0)
    assert row["pwatermark"] == pytest.approx(0.1) and row["punsafe"] == pytest.approx(0.01)
    # img2dataset's original_width/height (a pure 4x rescale here) are the micro-condition size
    assert row["orig_w"] % 4 == 0 and row["orig_w"] >= 4 * RES
    assert stats["kept"] == 13 and stats["failed"] == 1 and stats["rows_in"] == 14


def test_undecodable_image_is_failed_rest_kept(encoded):
    out, stats = encoded
    bad = [r for r in ledger_rows(out) if r["state"] == "failed"]
    assert [(r["key"], r["reason"], r["source"]) for r in bad] == [("000000003", "undecodable_image", "00000.tar")]
    assert len(CodeDataset(out).shards[0]) == 6
    ledger.reconcile(stats["rows_in"], ledger.counts(out))


def test_rerun_resumes_only_missing_shards(tmp_path, shards, vq_dir):
    out = tmp_path / "codes"
    run(cfg_for(vq_dir), shards, out)
    kept_marker = (out / "_done" / "00000.json").stat().st_mtime_ns
    before = CodeDataset(out).codes(np.arange(13))
    (out / "_done" / "00001.json").unlink()
    (out / "00001.arrow").unlink()
    stats = run(cfg_for(vq_dir, batch_size=3), shards, out)  # batch size is not part of the output's identity
    assert (out / "_done" / "00000.json").stat().st_mtime_ns == kept_marker
    assert np.array_equal(CodeDataset(out).codes(np.arange(13)), before)
    assert stats["kept"] == 13
    with pytest.raises(ConfigMismatchError, match="res"):
        run(cfg_for(vq_dir, res=2 * RES), shards, out)


def test_keep_list_filters_the_rest(tmp_path, shards, vq_dir):
    keep = tmp_path / "keep.parquet"
    pq.write_table(pa.table({"key": ["000000001", "000010002", "000010005"], "shard": ["00000.tar", "x/00001.tar", "00001"]}), keep)
    out = tmp_path / "codes"
    stats = run(cfg_for(vq_dir, keep_list=str(keep)), shards, out)
    # the undecodable sample is not in the keep list: filtered before anyone decodes it
    assert stats["kept"] == 3 and stats["filtered"] == 11 and stats["failed"] == 0
    filtered = {r["reason"] for r in ledger_rows(out) if r["state"] == "filtered"}
    assert filtered == {"not_in_keep_list"}
    assert sorted(CodeDataset(out).row(i)["key"] for i in range(3)) == ["000000001", "000010002", "000010005"]


def test_random_crop_is_seeded_and_recorded(tmp_path, shards, vq_dir):
    a = run(cfg_for(vq_dir, crop="random", seed=7), shards, tmp_path / "a")
    run(cfg_for(vq_dir, crop="random", seed=7), shards, tmp_path / "b")
    da, db = CodeDataset(tmp_path / "a"), CodeDataset(tmp_path / "b")
    crops = [(da.row(i)["crop_top"], da.row(i)["crop_left"]) for i in range(len(da))]
    assert crops == [(db.row(i)["crop_top"], db.row(i)["crop_left"]) for i in range(len(db))]
    assert np.array_equal(da.codes(np.arange(len(da))), db.codes(np.arange(len(db))))
    assert any(c != (0, 0) for c in crops) and a["kept"] == 13


def test_res_not_multiple_of_downsampling(tmp_path, shards, vq_dir):
    with pytest.raises(VQError, match="multiple of the tokenizer's downsampling factor 4"):
        run(cfg_for(vq_dir, res=30), shards, tmp_path / "o")


def test_missing_vq_names_the_file(tmp_path, shards):
    (tmp_path / "vq").mkdir()
    with pytest.raises(VQError, match="config.json: missing"):
        run(cfg_for(tmp_path / "vq"), shards, tmp_path / "o")
    with pytest.raises(ConfigError, match="--vq"):
        run(PretokenizeConfig(res=RES, executor="local"), shards, tmp_path / "o")


def _raw_tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_unsafe_members_refused_and_truncated_shard_kept(tmp_path, vq_dir, shard_maker):
    src = tmp_path / "in"
    src.mkdir()
    good = shard_maker(tmp_path, 9, 3, seed=3)
    members = [(f"{s.key}.{s.image_ext}", s.image) for s in good[:2]]
    members += [("/etc/evil.jpg", good[2].image), ("../escape.jpg", good[2].image)]
    _raw_tar(src / "00000.tar", members)
    shard_maker(src, 1, 6, seed=4)
    whole = (src / "00001.tar").read_bytes()
    (src / "00001.tar").write_bytes(whole[: int(len(whole) * 0.6)])  # ends mid-member
    out = tmp_path / "codes"
    stats = run(cfg_for(vq_dir), src, out)
    refused = {(r["key"], r["value"]) for r in ledger_rows(out) if r["reason"] == "refused_member"}
    assert refused == {("/etc/evil.jpg", "absolute path"), ("../escape.jpg", "path traversal (..)")}
    assert not (tmp_path / "escape.jpg").exists()
    assert "00001" in stats["damaged_shards"] and stats["refused_members"] == 2
    n_trunc = len(CodeDataset(out).shards[1])
    assert 1 <= n_trunc < 6  # the readable samples before the damage are kept
    assert json.loads((out / "_done" / "00001.json").read_text())["damaged"]
    ledger.reconcile(stats["rows_in"], ledger.counts(out))


def test_plan_actors():
    cfg = PretokenizeConfig(vq="x")
    assert plan_actors(cfg, cpus=2, gpus=0, n_shards=10) == plan_actors(cfg, 2, 0, 10)
    p = plan_actors(cfg, cpus=2, gpus=0, n_shards=10)
    assert (p.count, p.num_cpus, p.num_gpus, p.decode_threads) == (1, 2, 0, 2)
    p = plan_actors(cfg, cpus=64, gpus=8, n_shards=100)
    assert (p.count, p.num_cpus, p.num_gpus) == (8, 8, 1)
    p = plan_actors(cfg, cpus=32, gpus=0, n_shards=3)
    assert (p.count, p.num_cpus) == (3, 8)  # never more actors than shards
    p = plan_actors(PretokenizeConfig(vq="x", cpus_per_actor=4), cpus=16, gpus=0, n_shards=100)
    assert (p.count, p.num_cpus) == (4, 4)


def test_config_validation():
    for bad in (dict(crop="diagonal"), dict(dtype="fp8"), dict(batch_size=0), dict(executor="dask"),
                dict(source_resize="stretch")):
        with pytest.raises(ValueError):
            PretokenizeConfig(**bad)


def test_small_helpers():
    assert shard_id("/a/b/00012.tar") == "00012" == shard_id("00012")
    assert original_size({"original_width": 400, "original_height": 300}) == (400, 300)
    for bad in ({}, {"original_width": 0, "original_height": 3}, {"original_width": "400", "original_height": 300},
                {"original_width": True, "original_height": 1}):
        assert original_size(bad) is None  # the stored image's own size is used then


def test_a_lost_code_shard_or_ledger_is_redone_by_a_rerun(tmp_path, shards, vq_dir):
    out = tmp_path / "codes"
    first = run(cfg_for(vq_dir), shards, out)
    before = CodeDataset(out).codes(np.arange(13))
    kept_marker = (out / "_done" / "00000.json").stat().st_mtime_ns
    (out / "00001.arrow").unlink()  # its marker stays: the shard must still be redone
    (out / "_ledger" / "00001.parquet").unlink()
    again = run(cfg_for(vq_dir), shards, out)
    assert {k: v for k, v in again.items() if not k.endswith("_seconds")} == {
        k: v for k, v in first.items() if not k.endswith("_seconds")}
    assert (out / "_done" / "00000.json").stat().st_mtime_ns == kept_marker
    assert np.array_equal(CodeDataset(out).codes(np.arange(13)), before)


def test_a_bad_tokenizer_leaves_no_folder_that_blocks_the_fixed_rerun(tmp_path, shards, vq_dir):
    import shutil

    bad = tmp_path / "vq"
    shutil.copytree(vq_dir, bad)
    (bad / "diffusion_pytorch_model.safetensors").write_bytes(b"")
    with pytest.raises(VQError, match="unreadable safetensors"):
        run(cfg_for(bad), shards, tmp_path / "o")
    shutil.copy(vq_dir / "diffusion_pytorch_model.safetensors", bad)  # fixed: other weights, same folder
    assert run(cfg_for(bad), shards, tmp_path / "o")["kept"] == 13


def test_keep_list_types_and_duplicates_off_the_list(tmp_path, vq_dir, shard_maker):
    from core.errors import UserError

    src = tmp_path / "in"
    src.mkdir()
    good = shard_maker(tmp_path, 0, 3, seed=5)
    members = [(f"{s.key}.{s.image_ext}", s.image) for s in good] + [(f"{good[1].key}.{good[1].image_ext}", good[1].image)]
    _raw_tar(src / "00000.tar", members)  # key 1 twice, and key 1 is off the keep list
    keep = tmp_path / "keep.parquet"
    pq.write_table(pa.table({"key": [good[0].key], "shard": ["00000.tar"]}), keep)
    stats = run(cfg_for(vq_dir, keep_list=str(keep)), src, tmp_path / "codes")
    rows = sorted((r["row"], r["key"], r["state"], r["reason"]) for r in ledger_rows(tmp_path / "codes"))
    assert rows == [(0, good[0].key, "kept", None), (1, good[1].key, "filtered", "not_in_keep_list"),
                    (2, good[2].key, "filtered", "not_in_keep_list"), (3, good[1].key, "failed", "duplicate_key")]
    assert stats["rows_in"] == 4
    pq.write_table(pa.table({"key": [1], "shard": [0]}), keep)  # numbers lose the keys' leading zeros
    with pytest.raises(UserError, match="column `key` is int64, must be text"):
        run(cfg_for(vq_dir, keep_list=str(keep)), src, tmp_path / "codes2")
