"""`curate download` killed at 5 random points (the driver, SIGKILL), and separately with one of
img2dataset's pool processes killed mid-shard: the reruns end with the same ledger and the same
images as an uninterrupted run, and no URL of a shard finished before a kill is fetched again."""
from __future__ import annotations

import io
import random
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

import harness as H
import httpserver as hs

SHARDS, PER_SHARD, KILLS = 12, 12, 5


def image(i: int) -> bytes:
    rng = np.random.default_rng(i)
    arr = np.clip(rng.normal(128, 40, (48, 64, 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=80)
    return buf.getvalue()


@pytest.fixture(scope="module")
def server():
    with hs.ImageServer() as s:
        yield s


@pytest.fixture(scope="module")
def data(server, tmp_path_factory) -> Path:
    return build(tmp_path_factory.mktemp("dl-faults"), server)


def build(root: Path, server: hs.ImageServer) -> Path:
    """SHARDS x PER_SHARD images served slowly on loopback, their metadata and a download config."""
    urls = [server.add(f"img{i}.jpg", hs.Route(image(i), stall=0.08)) for i in range(SHARDS * PER_SHARD)]
    (root / "meta").mkdir()
    pq.write_table(pa.table({"URL": urls, "TEXT": [f"caption {i}" for i in range(len(urls))]}),
                   root / "meta" / "part-00000.parquet")
    (root / "cfg.yaml").write_text(yaml.safe_dump({"curate": {"download": {
        "image_size": 32, "samples_per_shard": PER_SHARD, "processes": 1, "threads": 2, "timeout": 5,
        "max_download_seconds": 10, "stall_seconds": 30, "allow_networks": ["127.0.0.0/8"]}}}))
    return root


def command(root: Path, out: Path) -> H.Command:
    argv = [str(H.BIN / "curate"), "download", "-i", str(root / "meta"), "-o", str(out), "-c", str(root / "cfg.yaml")]
    return H.Command("curate download", argv, [out], lambda: (H.markers(out), SHARDS),
                     lambda: (out / "_stats.json").is_file())


def snapshot(out: Path) -> dict:
    return {"ledger": H.ledger_rows(out), "stats": H.stats(out),
            "shards": {p.name: H.tar_samples(p) for p in sorted(out.glob("*.tar"))}}


def shard_urls(server: hs.ImageServer, shard: int) -> list[str]:
    return [f"img{i}.jpg" for i in range(shard * PER_SHARD, (shard + 1) * PER_SHARD)]


@pytest.fixture(scope="module")
def reference(data) -> dict:
    assert H.run_to_end(command(data, data / "ref"), data / "ref.log") == 0
    return snapshot(data / "ref")


def test_killed_five_times_then_rerun_fetches_no_finished_shard_twice(data, server, reference):
    out = data / "killed"
    cmd = command(data, out)
    reader = H.PartialReader([out])
    reader.start()
    rng, records, finished_at = random.Random(3), [], []
    for k in range(KILLS):
        records.append(H.kill_once(cmd, rng, data / "killed.log", share=1.0 / (KILLS - k + 1)))
        done = sorted(int(p.stem) for p in (out / "_done").glob("*.json")) if (out / "_done").is_dir() else []
        finished_at.append((dict(server.hits), done))
    assert H.run_to_end(cmd, data / "killed.log") == 0, (data / "killed.log").read_text()[-3000:]
    assert reader.stop() == []
    assert all(r.mid_run for r in records), records
    assert all(not r.survivors for r in records), records  # the worker and its pool died with the driver
    for hits_then, done in finished_at:  # a shard finished before a kill is never fetched again
        for shard in done:
            for url in shard_urls(server, shard):
                assert server.hits[url] == hits_then[url], (shard, url)
    assert snapshot(out) == reference
    acc = H.accounting(out)
    assert (acc["lost"], acc["doubled"]) == (0, 0), acc


def test_a_pool_process_killed_mid_shard_is_redone_by_the_rerun(data, reference):
    out = data / "worker-killed"
    cmd = command(data, out)

    def pool_process(p) -> bool:
        return "multiprocessing" in " ".join(p.cmdline()) and "resource_tracker" not in " ".join(p.cmdline())

    rc, killed = H.kill_a_worker(cmd, data / "worker.log", pool_process, random.Random(4), settle=0.5)
    assert killed, "no pool process was downloading while shards were left"
    if rc != 0:  # the pool lost a shard: the watchdog stopped it, the step ended incomplete
        assert rc == 1 and "incomplete" in (data / "worker.log").read_text()
        assert H.run_to_end(cmd, data / "worker.log") == 0
    assert snapshot(out) == reference
