"""`train run` killed at 5 random points, each run resuming the last checkpoint the one before
left: the final weights, optimizer state and data cursor are bit for bit those of an
uninterrupted run, and no reader ever saw a partial checkpoint file."""
from __future__ import annotations

import random
import sys
from pathlib import Path

import pytest
import torch

import harness as H
from core.config import REPO_PIPELINES
from train import checkpoint

STEPS, CKPT_EVERY, KILLS = 60, 4, 5
SETS = ["threads=1", "deterministic=true", "tensorboard=false", "sample.every=0", "log_every=1",
        f"ckpt_every={CKPT_EVERY}", "keep_last=3"]


def build(root: Path) -> Path:
    from code_folder import write_code_folder  # the train tests' code-shard writer

    write_code_folder(root / "codes", rows_per_shard=(12, 9))
    return root


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return build(tmp_path_factory.mktemp("train-faults"))


def command(root: Path, run_dir: Path) -> H.Command:
    argv = [sys.executable, "-m", "train.cli", "run", "debug", "--config", str(REPO_PIPELINES),
            "--data", str(root / "codes"), "--run-dir", str(run_dir), "--steps", str(STEPS)]
    for s in SETS:
        argv += ["--set", s]
    units = lambda: (max(checkpoint.all_steps(run_dir), default=0) // CKPT_EVERY, STEPS // CKPT_EVERY)  # noqa: E731
    last = checkpoint.step_dir(run_dir, STEPS)
    return H.Command("train run", argv, [last], units, lambda: (last / "state.pt").is_file())


def final(run_dir: Path) -> tuple[dict, dict]:
    ckpt = checkpoint.latest(run_dir)
    return checkpoint.load_weights(ckpt), checkpoint.load_state(ckpt)


def test_killed_five_times_then_resumed_equals_an_uninterrupted_run(data):
    ref = data / "ref"
    assert H.run_to_end(command(data, ref), data / "ref.log") == 0, (data / "ref.log").read_text()[-2000:]
    killed = data / "killed"
    cmd = command(data, killed)
    reader = H.PartialReader([killed / "checkpoints" / f"step_{s:08d}" for s in range(CKPT_EVERY, STEPS + 1, CKPT_EVERY)])
    reader.start()
    records = H.chain_of_kills(cmd, KILLS, random.Random(11), data / "killed.log")
    assert H.run_to_end(cmd, data / "killed.log") == 0, (data / "killed.log").read_text()[-2000:]
    assert reader.stop() == []
    assert all(r.mid_run for r in records), records
    (want_w, want_s), (got_w, got_s) = final(ref), final(killed)
    assert got_w.keys() == want_w.keys() and all(torch.equal(got_w[k], want_w[k]) for k in want_w)
    assert got_s["cursor"] == want_s["cursor"] and got_s["step"] == want_s["step"] == STEPS
    for a, b in zip(got_s["optimizer"]["state"].values(), want_s["optimizer"]["state"].values()):
        assert all(torch.equal(a[k], b[k]) for k in b if torch.is_tensor(b[k]))
