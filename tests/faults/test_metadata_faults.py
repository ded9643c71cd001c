"""`curate run` (dedup -> filter -> captions) killed at 5 random points, and separately with a
Ray worker killed mid-task: the reruns end with the same rows, ledgers and counts as an
uninterrupted run, no row lost or doubled, and no reader ever saw a partial file."""
from __future__ import annotations

import random
from pathlib import Path

import pytest
import yaml

import harness as H

FILES, BUCKETS, KILLS = 6, 8, 5
STEPS = ("dedup", "filter", "captions")


def build(root: Path, rows: int = 120_000) -> Path:
    """LAION-like metadata in FILES files (planted duplicates, missing scores) and a caption table."""
    from curate.metadata import synth

    synth.run(synth.SynthConfig(rows=rows, files=FILES, dup_rate=0.2, seed=5), root / "in", root / "caps.parquet")
    return root


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return build(tmp_path_factory.mktemp("meta-faults"))


def command(root: Path, out: Path) -> H.Command:
    cfg = out.parent / f"{out.name}.yaml"
    cfg.write_text(yaml.safe_dump({"pipelines": {"p": {"input": str(root / "in"), "output": str(out), "steps": [
        {"step": "dedup", "buckets": BUCKETS}, "filter",
        {"step": "captions", "captions": str(root / "caps.parquet"), "min_words": 20}]}}}))
    folders = [out / s for s in STEPS]
    total = (FILES + BUCKETS + FILES) + FILES + (1 + FILES)  # dedup's 3 phases, filter, captions

    def units() -> tuple[int, int]:
        return sum(H.markers(f) for f in folders), total

    return H.Command("curate run", [str(H.BIN / "curate"), "run", "--pipeline", "p", "--config", str(cfg)],
                     folders, units, lambda: all((f / "_stats.json").is_file() for f in folders))


def snapshot(out: Path) -> dict:
    snap = {}
    for step in STEPS:
        folder = out / step
        snap[step] = {"parts": {p.name: H.table_rows(p) for p in sorted(folder.glob("part-*.parquet"))},
                      "ledger": H.ledger_rows(folder), "stats": H.stats(folder)}
    return snap


@pytest.fixture(scope="module")
def reference(data) -> dict:
    cmd = command(data, data / "ref")
    assert H.run_to_end(cmd, data / "ref.log") == 0, (data / "ref.log").read_text()[-2000:]
    return snapshot(data / "ref")


def test_killed_five_times_then_rerun_equals_an_uninterrupted_run(data, reference):
    out = data / "killed"
    cmd = command(data, out)
    reader = H.PartialReader(cmd.folders)
    reader.start()
    records = H.chain_of_kills(cmd, KILLS, random.Random(1), data / "killed.log")
    assert H.run_to_end(cmd, data / "killed.log") == 0, (data / "killed.log").read_text()[-2000:]
    assert reader.stop() == [] and reader.reads > 0
    assert all(r.mid_run for r in records), records  # every kill landed between the first and last unit
    assert all(not r.survivors for r in records), records  # nothing of a killed run kept writing
    assert snapshot(out) == reference
    for step in STEPS:
        acc = H.accounting(out / step)
        assert (acc["lost"], acc["doubled"]) == (0, 0), (step, acc)
    assert not list(out.rglob("_tmp.*"))


def test_a_ray_worker_killed_mid_task_changes_nothing(data, reference):
    out = data / "worker-killed"
    cmd = command(data, out)
    rc, killed = H.kill_a_worker(cmd, data / "worker.log", H.ray_task_worker, random.Random(2))
    assert killed, "no Ray worker was running a unit while units were left"
    if rc != 0:  # Ray retries a task whose worker died; if it could not, the rerun finishes the job
        assert H.run_to_end(cmd, data / "worker.log") == 0
    assert snapshot(out) == reference
