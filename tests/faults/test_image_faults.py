"""`curate neardup`, `curate score` and `pretokenize`, each killed at 5 random points and
separately with a Ray worker killed mid-unit: the reruns end with the same outputs and ledgers
as an uninterrupted run, no row lost or doubled, no reader ever saw a partial file."""
from __future__ import annotations

import random
import zlib
from pathlib import Path

import pytest

import harness as H
from image_shards_fixture import jpeg, photo, sample, write_with_parquet

SHARDS, PER_SHARD, KILLS = 12, 40, 5  # units long enough (~0.2-0.5 s) for a kill to land between them
# Open-NSFW takes ~50 ms an image on one CPU thread: `score` gets the first 10 samples of each
# shard (~0.5 s a unit): 120 images a run instead of 480, ~6 CPU s of inference instead of ~23.
SCORE_PER_SHARD = 10


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return build(tmp_path_factory.mktemp("img-faults"))


def build(root: Path) -> Path:
    """Image shards as img2dataset writes them (photo crops with exact and near duplicates), a
    shorter copy of each for `score`, and a tiny VQ."""
    names = ("astronaut", "coffee", "chelsea", "rocket", "camera", "horse")
    pics = {n: photo(n) for n in names}
    for s in range(SHARDS):
        samples = []
        for i in range(PER_SHARD):
            n = names[(s + i) % len(names)]
            w, h = pics[n].size
            box = (i % 3 * 7, i % 2 * 5, w - (s % 4) * 9, h - i % 5 * 3)  # crops: near duplicates
            data = jpeg(pics[n].crop(box), quality=70 + i % 3 * 10, size=(384, 288))
            key = f"{s:05d}{i:04d}"
            samples.append(sample(key, data, f"http://host{i % 4}.example/{key}.jpg", f"{n} {i}", aesthetic=5.0 + i / 10))
        for folder, rows in (("shards", samples), ("shards-score", samples[:SCORE_PER_SHARD])):
            (root / folder).mkdir(parents=True, exist_ok=True)
            write_with_parquet(root / folder, f"{s:05d}", rows)
    from core import vq as V

    V.save_vq(V.build_vq(V.tiny_vq_config(codebook=64, downsample=4, width=8), seed=0), root / "vq")
    return root


COMMANDS = {
    "neardup": lambda root, out: [str(H.BIN / "curate"), "neardup", "-i", str(root / "shards"), "-o", str(out)],
    "score": lambda root, out: [str(H.BIN / "curate"), "score", "-i", str(root / "shards-score"), "-o", str(out), "--nsfw",
                                "--batch-size", "4", "--actors", "2"],
    "pretokenize": lambda root, out: [str(H.BIN / "pretokenize"), "--res", "32", "-i", str(root / "shards"), "-o", str(out),
                                      "--vq", str(root / "vq"), "--batch-size", "4", "--num-actors", "2",
                                      "--cpus-per-actor", "1"],
}
UNIT_GLOB = {"neardup": "hash.*.json", "score": "score.*.json", "pretokenize": "*.json"}


def command(name: str, root: Path, out: Path) -> H.Command:
    return H.Command(name, COMMANDS[name](root, out), [out], lambda: (H.markers(out, UNIT_GLOB[name]), SHARDS),
                     lambda: (out / "_stats.json").is_file())


def snapshot(name: str, out: Path) -> dict:
    snap = {"ledger": H.ledger_rows(out), "stats": H.stats(out)}
    if name == "neardup":
        snap["keep"] = H.table_rows(out / "keep.parquet")
        snap["groups"] = H.table_rows(out / "_groups.parquet")
    elif name == "score":
        snap["scores"] = {p.name: H.table_rows(p) for p in sorted(out.glob("*.parquet"))}
    else:
        from core.codeshard import CodeDataset

        ds = CodeDataset(out)
        snap["codes"] = sorted((r["key"], r["codes"].tobytes(), r["orig_w"], r["crop_top"]) for r in map(ds.row, range(len(ds))))
        snap["shards"] = sorted((s.name, s.rows, s.sha256) for s in ds.manifest.shards)
    return snap


@pytest.fixture(scope="module")
def references(data) -> dict:
    refs = {}
    for name in COMMANDS:
        out = data / f"ref-{name}"
        assert H.run_to_end(command(name, data, out), data / f"ref-{name}.log") == 0, (data / f"ref-{name}.log").read_text()[-2000:]
        refs[name] = snapshot(name, out)
    return refs


@pytest.mark.parametrize("name", list(COMMANDS))
def test_killed_five_times_then_rerun_equals_an_uninterrupted_run(name, data, references):
    out = data / f"killed-{name}"
    cmd = command(name, data, out)
    reader = H.PartialReader([out])
    reader.start()
    records = H.chain_of_kills(cmd, KILLS, random.Random(zlib.crc32(name.encode())), data / f"killed-{name}.log")
    assert H.run_to_end(cmd, data / f"killed-{name}.log") == 0, (data / f"killed-{name}.log").read_text()[-2000:]
    assert reader.stop() == []
    assert all(r.mid_run for r in records), records
    assert all(not r.survivors for r in records), records
    assert snapshot(name, out) == references[name]
    acc = H.accounting(out)
    assert (acc["lost"], acc["doubled"]) == (0, 0), acc


@pytest.mark.parametrize("name", list(COMMANDS))
def test_a_ray_worker_killed_mid_unit_changes_nothing(name, data, references):
    out = data / f"worker-{name}"
    cmd = command(name, data, out)
    rc, killed = H.kill_a_worker(cmd, data / f"worker-{name}.log", H.ray_task_worker, random.Random(7))
    assert killed, "no Ray worker was running a unit while units were left"
    if rc != 0:  # an actor that died took its unit with it: recorded, the step ended incomplete
        assert rc == 1 and "incomplete" in (data / f"worker-{name}.log").read_text()
        assert H.run_to_end(cmd, data / f"worker-{name}.log") == 0
    assert snapshot(name, out) == references[name]
