"""bench/gpu_stages.py without a GPU: its stage commands resolve to valid stage configs (the
overrides it sends to `train run`), steady-state parsing, the trainer/bench comparison and a
measured.json that `train plan --measured` reads. (The whole script runs on CPU with --small.)"""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from core.config import REPO_PIPELINES, parse_sets
from train.stages import load_stage, plan_measured

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "gpu_stages.py"


@pytest.fixture(scope="module")
def stages():
    spec = importlib.util.spec_from_file_location("gpu_stages_bench", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def _config(cmd: list[str]):
    """The StageConfig `train run` would resolve from this command line."""
    stage = cmd[cmd.index("run") + 1]
    flag = lambda name: cmd[cmd.index(name) + 1]  # noqa: E731
    sets = [cmd[i + 1] for i, a in enumerate(cmd) if a == "--set"]
    overrides = parse_sets(sets)
    overrides.update(steps=int(flag("--steps")), batch_size=int(flag("--batch-size")),
                     micro_batch_size=int(flag("--micro-batch-size")), data={"path": flag("--data")})
    return load_stage(stage, REPO_PIPELINES, overrides)


def test_gpu_commands_are_the_real_stages_with_valid_overrides(stages, tmp_path):
    args = stages.parse_args(["--out", str(tmp_path)])
    previous = None
    for run in stages.GPU_PLAN:
        cmd = stages.stage_command(args, run, tmp_path / "codes", tmp_path / run.stage, previous)
        cfg = _config(cmd)
        assert cmd[cmd.index("run") + 1] == run.stage and cfg.resolution == run.res and cfg.steps >= 200
        assert cfg.compile and cfg.text.random and cfg.sample.every == cfg.steps
        assert cfg.batch_size == run.micro * run.accum and run.accum >= 2  # accumulation is exercised
        assert cfg.init_from == (str(previous) if previous else None)
        assert cfg.ckpt_every == cfg.steps and cfg.steps % cfg.log_every == 0
        previous = tmp_path / run.stage
    assert _config(cmd).downsample and _config(cmd).data.long_caption_prob == 0.5  # stage3 as shipped


def test_steady_state_comparison_and_measured_plan(stages, tmp_path):
    run = stages.GPU_PLAN[0]
    records = [{"step": 10 * (i + 1), "samples_per_s": 64 / (5.0 if i < 3 else 0.2 + 0.01 * (i % 2)),
                "mfu": 0.4, "long_caption_share": 0.0} for i in range(20)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    steady = stages.steady_state(tmp_path, run)
    assert steady["windows"] == 17 and steady["step_s"] == pytest.approx(0.21) and steady["steps"] == 200  # 9 of 17 at 0.21 s
    result = {"stage1": dict(steady, resolution=256, micro_batch=32, accum=2, world=1)}
    stages.compare(result, stages.GPU_PLAN, [{"res": 256, "step_s_median": 0.19}])
    assert result["stage1"]["trainer_over_bench"] == pytest.approx(0.21 / 0.19)
    planned = plan_measured(load_stage("stage1", REPO_PIPELINES), result["stage1"], "h100", 1)
    assert planned["images_per_s_per_gpu"] == pytest.approx(64 / 0.21)
