"""Gradient sync under accumulation: exactly one reduction round per cycle, none in the other
micro-batches, for the real Trainer under DDP and FSDP2, with and without compiled blocks, and
for `no_sync` given a torch.compile(DDP) wrapper. torchrun, 2 ranks, gloo on CPU; the compiled
variants use the aot_eager backend (the graphs Inductor would get, without code generation)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("sync_worker.py")


def test_one_gradient_reduction_per_accumulation_cycle(tmp_path, make_code_folder):
    data = make_code_folder(tmp_path / "codes", rows_per_shard=(10, 7))
    args = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
            str(WORKER), str(data), str(tmp_path / "runs")]
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    done = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(next(line for line in done.stdout.splitlines() if line.startswith("{")))
    assert results.pop("ordered_sum_rel_diff") < 1e-6  # deterministic DDP averages like DDP (to rounding)
    assert set(results) == {"ddp", "ddp_compiled", "compile(ddp)", "fsdp", "fsdp_compiled"}
    for mode, r in results.items():
        assert r["early"] == 0, (mode, r)  # no reduction while accumulating
        assert r["rounds"] == [1.0, 1.0], (mode, r)  # 2 optimizer steps x accumulation 4: one round each
    assert results["ddp_compiled"]["compiled"] and results["fsdp_compiled"]["compiled"]
    assert not results["ddp"]["compiled"] and results["fsdp"]["units"] == 3  # 2 blocks + the root
