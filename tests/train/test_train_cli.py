"""`train run | sample | plan` through typer's CliRunner (in-process, tiny data)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from core.config import REPO_PIPELINES
from train.cli import app

runner = CliRunner()
FAST = ["--set", "threads=1", "--set", "tensorboard=false", "--set", "log_every=1", "--set", "ckpt_every=2"]


@pytest.fixture(autouse=True)
def _restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _run(data, run_dir, *extra):
    args = ["run", "debug", "--config", str(REPO_PIPELINES), "--data", str(data), "--run-dir", str(run_dir),
            "--steps", "2", *FAST, *extra]
    return runner.invoke(app, args)


@pytest.fixture
def tiny_vq(tmp_path):
    """A tiny VQ (f4, 16 codes) saved to disk, loaded back through core.vq by the code under test."""
    from core.vq import build_vq, save_vq, tiny_vq_config

    return save_vq(build_vq(tiny_vq_config(codebook=16, downsample=4)), tmp_path / "vq")


@pytest.fixture
def trained(tmp_path, code_folder, tiny_vq):
    result = _run(code_folder, tmp_path / "run", "--set", "sample.every=2", "--set", "sample.steps=3",
                  "--set", "sample.decode=vq", "--set", f"sample.vq={tiny_vq}")
    assert result.exit_code == 0, result.output
    return tmp_path / "run"


def test_run_writes_run_folder(trained):
    assert (trained / "_config.yaml").is_file() and (trained / "metrics.jsonl").is_file()
    assert (trained / "checkpoints" / "step_00000002" / "model.safetensors").is_file()
    assert (trained / "loss.png").is_file()
    # 4 fixed prompts decoded by the VQ: 2x2 cells of 16x16 px (4x4 codes, f4)
    assert np.asarray(Image.open(trained / "samples" / "step_00000002.png")).shape == (32, 32, 3)


def test_rerun_of_a_finished_run_draws_a_missing_last_grid(trained, tiny_vq, code_folder):
    """Killed after the last checkpoint, before the last grid: the rerun finishes the grid."""
    grid = trained / "samples" / "step_00000002.png"
    grid.unlink()
    result = _run(code_folder, trained, "--set", "sample.every=2", "--set", "sample.steps=3",
                  "--set", "sample.decode=vq", "--set", f"sample.vq={tiny_vq}")
    assert result.exit_code == 0, result.output
    assert np.asarray(Image.open(grid)).shape == (32, 32, 3)


def test_sample_says_when_the_ema_weights_of_an_ema_run_are_gone(trained, tmp_path):
    args = ["sample", "--checkpoint", str(trained), "--prompt", "a cat", "--n", "1", "--steps", "2",
            "--decode", "codes", "--out", str(tmp_path / "g.png")]
    last = trained / "checkpoints" / "step_00000002"
    assert (last / "ema.safetensors").is_file()  # the debug stage keeps EMA weights
    (last / "ema.safetensors").unlink()
    result = runner.invoke(app, args)
    assert result.exit_code == 2 and "the run kept EMA weights but ema.safetensors is missing" in result.output
    assert runner.invoke(app, args + ["--no-ema"]).exit_code == 0


def test_sample_codes_and_vq(trained, tmp_path):
    out = tmp_path / "grid.png"
    args = ["sample", "--checkpoint", str(trained), "--prompt", "a cat", "--prompt", "a dog", "--n", "2",
            "--steps", "3", "--out", str(out)]
    result = runner.invoke(app, args + ["--decode", "codes"])
    assert result.exit_code == 0, result.output
    assert np.asarray(Image.open(out)).shape == (64, 64, 3)  # 2x2 cells of 4x4 codes x 8 px
    # No VQ where --vq points: a clear error, exit 2.
    result = runner.invoke(app, args + ["--vq", str(tmp_path / "missing")])
    assert result.exit_code == 2 and "error" in result.output
    # Default: the VQ the run recorded (sample.vq here; else the data manifest's tokenizer path).
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert np.asarray(Image.open(out)).shape == (32, 32, 3)  # 2x2 cells of 16x16 px


def test_sample_refuses_an_out_it_cannot_write_before_sampling(trained, tmp_path):
    args = ["sample", "--checkpoint", str(trained), "--prompt", "a cat", "--n", "1", "--steps", "2", "--decode", "codes"]
    (tmp_path / "grids").mkdir()
    result = runner.invoke(app, args + ["--out", str(tmp_path / "grids")])
    assert result.exit_code == 2 and "is a folder; --out names the PNG file" in result.output
    result = runner.invoke(app, args + ["--out", str(tmp_path / "g.jpg")])
    assert result.exit_code == 2 and "written as PNG" in result.output and not (tmp_path / "g.jpg").exists()
    result = runner.invoke(app, args + ["--out", str(tmp_path / "g.png"), "--n", "0"])
    assert result.exit_code == 2 and "--steps and --n must be >= 1, got --steps 2 --n 0" in result.output


def test_sample_guidance_defaults_to_the_runs_stage(trained, tmp_path, monkeypatch):
    import train.sampler as S

    seen = []
    real = S.generate
    monkeypatch.setattr(S, "generate", lambda *a, **k: seen.append(k["cfg"]) or real(*a, **k))
    args = ["sample", "--checkpoint", str(trained), "--prompt", "a cat", "--n", "1", "--steps", "2",
            "--decode", "codes", "--out", str(tmp_path / "g.png")]
    assert runner.invoke(app, args).exit_code == 0
    assert runner.invoke(app, args + ["--cfg", "5"]).exit_code == 0
    assert seen == [3.0, 5.0]  # the debug stage's sample.cfg (pipelines.yaml), then the flag


def test_resume_refuses_another_config(trained, code_folder):
    result = _run(code_folder, trained, "--set", "seed=5")
    assert result.exit_code == 2 and "different config" in result.output


def test_user_errors_exit_2(tmp_path, code_folder):
    result = runner.invoke(app, ["run", "debug", "--config", str(REPO_PIPELINES), "--run-dir", str(tmp_path / "r")])
    assert result.exit_code == 2 and "--data" in result.output
    result = _run(code_folder, tmp_path / "r2", "--set", "resolution=512")
    assert result.exit_code == 2 and "this stage trains at 512 px" in result.output
    result = _run(code_folder, tmp_path / "r3", "--set", "optim.lrr=1")
    assert result.exit_code == 2 and "unknown key 'lrr'" in result.output


def test_plan_and_help():
    result = runner.invoke(app, ["plan", "stage1", "--gpus", "64", "--gpu", "h100", "--mfu", "0.4",
                                 "--config", str(REPO_PIPELINES)])
    assert result.exit_code == 0 and "gpu_days" in result.output and "16x16" in result.output
    for cmd in ("run", "sample", "plan"):
        assert runner.invoke(app, [cmd, "--help"]).exit_code == 0


MEASURED = {  # fabricated but realistic: what bench/gpu_stages.py writes after one H100 call
    "gpu": "h100", "device": "NVIDIA H100 80GB HBM3",
    "stages": {"stage1": {"resolution": 256, "micro_batch": 64, "accum": 1, "world": 1, "step_s": 0.2},
               "stage2": {"resolution": 512, "micro_batch": 16, "accum": 1, "world": 1, "step_s": 0.19},
               "stage3": {"resolution": 1024, "micro_batch": 16, "accum": 1, "world": 1, "step_s": 0.5}}}


def test_plan_measured_turns_step_times_into_gpu_days(tmp_path):
    import json

    from train.flops import flops_per_token
    from train.model import MODELS
    from train.stages import load_stage, plan_measured

    s1 = plan_measured(load_stage("stage1", REPO_PIPELINES), MEASURED["stages"]["stage1"], "h100", 8)
    # 100k steps x 2048 images at 64 images / 0.2 s = 320 images/s on one GPU: 640,000 s
    assert s1["images"] == 204_800_000 and s1["images_per_s_per_gpu"] == pytest.approx(320.0)
    assert s1["gpu_days"] == pytest.approx(640_000 / 86400) and s1["wall_days"] == pytest.approx(s1["gpu_days"] / 8)
    assert s1["mfu"] == pytest.approx(flops_per_token(MODELS["meissonic-1b"], (16, 16)) * 256 * 320 / 989e12)
    s3 = plan_measured(load_stage("stage3", REPO_PIPELINES), MEASURED["stages"]["stage3"], "h100", 8)
    assert s3["gpu_days"] == pytest.approx(42_000 * 256 / 32.0 / 86400)  # 16 images / 0.5 s

    path = tmp_path / "measured.json"
    path.write_text(json.dumps(MEASURED))
    result = runner.invoke(app, ["plan", "--measured", str(path), "--gpus", "8", "--config", str(REPO_PIPELINES)])
    assert result.exit_code == 0, result.output
    total = (640_000 + 51_200_000 / (16 / 0.19) + 10_752_000 / 32.0) / 86400  # 18.33 H100-days
    assert f"{total:.2f}" in result.output and f"{total / 8:.2f}" in result.output and "goal <= 12" in result.output
    bad = dict(MEASURED, stages={"stage2": dict(MEASURED["stages"]["stage2"], resolution=256)})
    path.write_text(json.dumps(bad))
    result = runner.invoke(app, ["plan", "stage2", "--measured", str(path), "--config", str(REPO_PIPELINES)])
    assert result.exit_code == 2 and "measured at 256 px" in result.output


def test_sample_uses_ema_weights_when_the_run_kept_them(trained, tmp_path, code_folder):
    from train.sampler import load_for_sampling

    ema_model, _, meta = load_for_sampling(trained)  # the debug stage keeps EMA weights (pipelines.yaml)
    raw_model, _, raw_meta = load_for_sampling(trained, ema=False)
    assert (meta["weights"], raw_meta["weights"]) == ("ema", "raw")
    assert any(not torch.equal(a, b) for a, b in zip(ema_model.parameters(), raw_model.parameters()))
    # A run without EMA samples with its raw weights; asking for EMA weights it lacks is a user error.
    assert _run(code_folder, tmp_path / "plain", "--set", "ema.enabled=false").exit_code == 0
    assert load_for_sampling(tmp_path / "plain")[2]["weights"] == "raw"
    args = ["sample", "--checkpoint", str(tmp_path / "plain"), "--prompt", "a cat", "--n", "1", "--steps", "2",
            "--decode", "codes", "--out", str(tmp_path / "g.png")]
    assert runner.invoke(app, args + ["--no-ema"]).exit_code == 0
    result = runner.invoke(app, args + ["--ema"])
    assert result.exit_code == 2 and "no ema.safetensors" in result.output


def test_a_finished_run_is_extended_and_harmless_changes_resume(tmp_path, code_folder):
    import json
    import yaml

    run = tmp_path / "run"
    assert _run(code_folder, run).exit_code == 0
    link = tmp_path / "codes-link"
    link.symlink_to(code_folder)
    # more steps, the data folder spelled otherwise, execution settings changed: the same run, extended
    result = _run(f"{code_folder}/", run, "--steps", "4", "--set", "keep_last=0",
                  "--set", "threads=2", "--micro-batch-size", "4")
    assert result.exit_code == 0, result.output
    assert "steps 2->4" in " ".join(result.output.split())
    result = _run(link, run, "--steps", "6")
    assert result.exit_code == 0, result.output
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    assert steps == [1, 2, 3, 4, 5, 6]
    assert yaml.safe_load((run / "_config.yaml").read_text())["info"]["steps"] == 6
    result = _run(code_folder, run, "--steps", "6", "--set", "optim.lr=0.002")  # what decides the weights: refused
    assert result.exit_code == 2 and "optim.lr" in result.output


def test_a_run_that_failed_before_its_first_checkpoint_takes_the_fixed_settings(tmp_path, code_folder):
    result = _run(code_folder, tmp_path / "r", "--batch-size", "6", "--micro-batch-size", "4")
    assert result.exit_code == 2 and "not a multiple of 1 GPU(s) x micro-batch 4" in " ".join(result.output.split())
    assert "Traceback" not in result.output
    result = _run(code_folder, tmp_path / "r", "--batch-size", "4")  # another identity: no checkpoint to protect
    assert result.exit_code == 0, result.output


def test_a_diverged_run_stops_before_logging_or_saving_nan(tmp_path, code_folder, monkeypatch):
    import train.trainer as T

    real = T.masked_ce
    monkeypatch.setattr(T, "masked_ce", lambda *a: real(*a) * float("nan"))
    result = _run(code_folder, tmp_path / "r", "--steps", "4")
    out = " ".join(result.output.split())
    assert result.exit_code == 2 and "the loss is nan over steps 1-1: the run diverged" in out
    assert "it has no checkpoint" in out and "lower optim.lr" in out
    assert not (tmp_path / "r" / "checkpoints").exists() or not list((tmp_path / "r" / "checkpoints").iterdir())
    assert "NaN" not in ((tmp_path / "r" / "metrics.jsonl").read_text() if (tmp_path / "r" / "metrics.jsonl").exists() else "")


@pytest.mark.parametrize("setting,says", [
    ("optim=3", "train.stages.debug.optim: expected a mapping of OptimConfig keys, got 3"),
    ("text=null", "expected a mapping of TextConfig keys, got null"),
    ("sample.prompts=abc", "sample.prompts: expected a list, got 'abc'"),
    ("batch_size=", "batch_size: expected int, got null"),
    ("seed=-1", "seed must lie in [0, 2**63)"),
    ("optim.lr=.inf", "optim.lr must be a finite number > 0"),
    ("optim.eps=0.0", "optim.eps must be a finite number > 0"),
    ("sample.cfg=.nan", "a finite sample.cfg >= 0"),
    ("keep_last=-2", "keep_last must be >= 0"),
])
def test_config_mistakes_are_one_line_before_any_work(tmp_path, code_folder, setting, says):
    result = _run(code_folder, tmp_path / "r", "--set", setting)
    assert result.exit_code == 2 and says in " ".join(result.output.split()), result.output
    assert "Traceback" not in result.output and not (tmp_path / "r").exists()


def test_sample_and_plan_mistakes_are_one_line(trained, tmp_path):
    base = ["sample", "--checkpoint", str(trained), "--prompt", "a cat", "--steps", "2", "--decode", "codes"]
    (tmp_path / "f").write_text("x")
    for extra, says in ((["--cfg", "nan", "--out", str(tmp_path / "g.png")], "--cfg must be a finite number >= 0"),
                        (["--n", "100000", "--out", str(tmp_path / "g.png")], "one grid holds at most 1,024"),
                        (["--out", str(tmp_path / "f" / "g.png")], f"cannot be written: {tmp_path / 'f'} is a file")):
        result = runner.invoke(app, base + extra)
        assert result.exit_code == 2 and says in " ".join(result.output.split()), result.output
    (tmp_path / "m.json").write_text("{}")
    for path, says in ((tmp_path / "m.json", "not a measurement file as bench/gpu_stages.py writes it (KeyError"),
                       (tmp_path, "Is a directory")):
        result = runner.invoke(app, ["plan", "--measured", str(path), "--config", str(REPO_PIPELINES)])
        assert result.exit_code == 2 and says in " ".join(result.output.split()), result.output
