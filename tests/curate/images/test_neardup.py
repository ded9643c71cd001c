"""curate neardup: hashing, placeholder / sha256 / pHash rules, keep rule, outputs, reruns."""
from __future__ import annotations

import json
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from core.rundir import ConfigMismatchError
from curate.images import grouping, hashing, neardup
from curate.images.neardup import NearDupConfig
from image_shards_fixture import neardup_shards

CFG = NearDupConfig(distance=4, placeholder_hosts=3)


def ledger_of(out) -> dict[str, dict]:
    table = pq.read_table(out / "_ledger")
    return {r["key"]: r for r in table.to_pylist()}


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return neardup_shards(tmp_path_factory.mktemp("nd") / "shards")


@pytest.fixture(scope="module")
def result(shards, tmp_path_factory, ray_local):
    out = tmp_path_factory.mktemp("nd_out") / "out"
    stats = neardup.run(NearDupConfig(distance=4, placeholder_hosts=3, write_shards=True), str(shards), str(out))
    return out, stats


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="distance"):
        NearDupConfig(distance=40)
    with pytest.raises(ValueError, match="bands"):
        NearDupConfig(distance=4, bands=3)
    with pytest.raises(ValueError, match="placeholder_hosts"):
        NearDupConfig(placeholder_hosts=-1)


def test_url_host_and_phash_are_stable() -> None:
    import imagehash

    from image_shards_fixture import photo

    assert hashing.url_host("https://WWW.Example.com:8080/a.jpg") == "example.com"
    assert hashing.url_host(None) is None and hashing.url_host("") is None
    im = photo("astronaut")
    # Same bits as imagehash's hex form, and the value pinned Pillow 13 + imagehash 4.3.2 give:
    # a change here means hashes from older runs no longer compare (see ENVIRONMENT: pin Pillow).
    assert hashing.phash64(im) == int(str(imagehash.phash(im)), 16) == 0xC2924C5532BDDFC8


def test_every_rule_ends_in_the_expected_state(result) -> None:
    out, stats = result
    led = ledger_of(out)
    assert stats["rows_in"] == 13 and len(led) == 13
    kept = {k for k, r in led.items() if r["state"] == "kept"}
    assert kept == {"000010000", "000000001", "000000005", "000010005"}
    # Near-dup by pHash: the higher-aesthetic small copy wins over the original.
    assert (led["000000000"]["state"], led["000000000"]["ref"], led["000000000"]["reason"]) == ("duplicate", "000010000", "phash")
    assert led["000010004"]["ref"] == "000010000" and led["000010004"]["reason"] == "phash"
    # Exact copy, same aesthetic and size: the smaller key wins; reason sha256.
    assert (led["000010001"]["ref"], led["000010001"]["reason"]) == ("000000001", "sha256")
    # Placeholder seen under 3 hosts (www. stripped): every copy filtered.
    for k in ("000000004", "000010002", "000010003"):
        assert (led[k]["state"], led[k]["reason"], led[k]["value"]) == ("filtered", "placeholder", "3 hosts")
    assert "truncated" in led["000000002"]["reason"] or "undecodable" in led["000000002"]["reason"]
    assert led["000000003"]["reason"] == "empty image (0 bytes)"
    assert led["000010099"]["state"] == "failed" and "missing from 00001.tar" in led["000010099"]["reason"]
    assert {s: stats[s] for s in ("kept", "duplicate", "filtered", "failed")} == {
        "kept": 4, "duplicate": 3, "filtered": 3, "failed": 3}


def test_keep_list_and_groups(result) -> None:
    out, _ = result
    keep = pq.read_table(out / "keep.parquet").to_pylist()
    assert keep == sorted(keep, key=lambda r: (r["shard"], r["key"]))
    assert {(r["key"], r["shard"]) for r in keep} == {
        ("000000001", "00000.tar"), ("000000005", "00000.tar"), ("000010000", "00001.tar"), ("000010005", "00001.tar")}
    groups = {g["kept_key"]: g for g in pq.read_table(out / "_groups.parquet").to_pylist()}
    astro = groups["000010000"]
    assert astro["size"] == 3 and astro["members"][0] == "000010000" and astro["distances"][0] == 0
    assert set(astro["members"]) == {"000010000", "000000000", "000010004"}
    assert all(0 <= d <= 4 for d in astro["distances"])
    assert groups["000000001"]["members"] == ["000000001", "000010001"]
    assert groups["000000001"]["reasons"] == ["kept", "sha256"]
    assert len(groups) == 2  # singletons are not groups


def test_write_shards_holds_only_kept_samples(result) -> None:
    out, _ = result
    with tarfile.open(out / "00001.tar") as tar:
        names = sorted(tar.getnames())
    assert names == sorted(f"{k}.{e}" for k in ("000010000", "000010005") for e in ("jpg", "txt", "json"))
    assert pq.read_table(out / "00001.parquet")["key"].to_pylist() == ["000010000", "000010005"]


def test_stats_reconcile_and_rerun_skips_hashing(result, shards) -> None:
    out, stats = result
    on_disk = json.loads((out / "_stats.json").read_text())
    assert on_disk["rows_in"] == sum(on_disk[s] for s in ("kept", "filtered", "duplicate", "failed"))
    before = {p.name: p.stat().st_mtime_ns for p in (out / "_hashes").glob("*.parquet")}
    again = neardup.run(NearDupConfig(distance=4, placeholder_hosts=3, write_shards=True), str(shards), str(out))
    assert again == stats
    assert {p.name: p.stat().st_mtime_ns for p in (out / "_hashes").glob("*.parquet")} == before
    with pytest.raises(ConfigMismatchError, match="distance"):
        neardup.run(NearDupConfig(distance=2, placeholder_hosts=3, write_shards=True), str(shards), str(out))


def test_decisions_do_not_depend_on_row_order(result) -> None:
    out, _ = result
    table = pa.concat_tables([pq.read_table(p) for p in sorted((out / "_hashes").glob("*.parquet"))])
    base = grouping.decide(table, CFG.distance, CFG.placeholder_hosts)
    perm = np.random.default_rng(0).permutation(table.num_rows)
    shuffled = grouping.decide(table.take(pa.array(perm)), CFG.distance, CFG.placeholder_hosts)
    keys = table["key"].to_pylist()
    want = {keys[i]: (base.state[i], base.ref[i]) for i in range(len(keys))}
    got = {keys[p]: (shuffled.state[i], shuffled.ref[i]) for i, p in enumerate(perm)}
    assert got == want


def test_kept_rows_rule_order() -> None:
    group = np.array([0, 0, 0, 3, 3])
    aesthetic = np.array([5.0, np.nan, 5.0, 1.0, 1.0])
    area = np.array([100, 10**6, 200, 50, 50])
    key_rank = np.array([0, 1, 2, 4, 3])
    # group 0: 0 and 2 tie on aesthetic (nan ranks lowest) -> larger area 2; group 3: smaller key 4 (rank 3).
    assert grouping.kept_rows(group, aesthetic, area, key_rank).tolist() == [2, 2, 2, 4, 4]


def test_placeholder_hashes_counts_distinct_hosts() -> None:
    ph = np.array([7, 7, 7, 7, 9], dtype=np.uint64)
    hosts = grouping.codes(pa.chunked_array([pa.array(["a", "a", "b", None, "a"])]))
    assert hosts.tolist() == [0, 0, 1, -1, 0]
    assert grouping.placeholder_hashes(ph, hosts, 2) == {7: 2}
    assert grouping.placeholder_hashes(ph, hosts, 3) == {}
    assert grouping.placeholder_hashes(ph, hosts, 0) == {}


def test_truncated_tar_keeps_what_it_can_and_fails_the_rest(shards, tmp_path) -> None:
    import shutil

    damaged = tmp_path / "00001.tar"
    data = (shards / "00001.tar").read_bytes()
    damaged.write_bytes(data[: len(data) // 2])  # cut mid-shard, as a killed download leaves it
    shutil.copy(shards / "00001.parquet", tmp_path / "00001.parquet")
    info = hashing.hash_shard(damaged, tmp_path / "_hashes" / "00001.parquet", 10**8)
    rows = pq.read_table(tmp_path / "_hashes" / "00001.parquet").to_pylist()
    assert info["damaged"] and info["rows"] == len(rows) == 7  # 6 listed + 1 extra success in the parquet
    read = [r for r in rows if r["error"] is None]
    lost = [r for r in rows if r["error"] is not None]
    assert read and lost and all(r["phash"] is not None for r in read)
    assert all(r["error"].startswith("lost_from_tar: missing from 00001.tar:") for r in lost)


def test_lost_outputs_are_redone_by_a_rerun(result, shards, tmp_path) -> None:
    # The keep list, a ledger part, a hash part and a kept shard deleted after a finished run:
    # the rerun redoes what they came from (the grouping's scratch is gone by then) and ends
    # with the same folder, instead of counting a ledger that is not there.
    out, stats = result
    cfg = NearDupConfig(distance=4, placeholder_hosts=3, write_shards=True)
    mine = tmp_path / "out"
    assert neardup.run(cfg, str(shards), str(mine)) == stats
    want = {p.relative_to(mine): p.read_bytes() for p in mine.rglob("*") if p.is_file() and p.suffix in (".parquet", ".tar")
            and "_done" not in p.parts}
    for rel in ("keep.parquet", "_ledger/00001.parquet", "_hashes/00000.parquet", "00001.tar"):
        (mine / rel).unlink()
    assert neardup.run(cfg, str(shards), str(mine)) == stats
    assert {rel: (mine / rel).read_bytes() for rel in want} == want
