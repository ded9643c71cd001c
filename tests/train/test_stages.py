import pytest

from core.config import REPO_PIPELINES, ConfigError
from train.stages import StageConfig, load_stage, plan_stage


def test_paper_stages_from_pipelines_yaml():
    s1, s2, s3 = (load_stage(n, REPO_PIPELINES) for n in ("stage1", "stage2", "stage3"))
    assert (s1.resolution, s1.batch_size, s1.steps, s1.downsample) == (256, 2048, 100_000, False)
    assert (s2.resolution, s2.batch_size, s2.steps, s2.init_from) == (512, 512, 100_000, "runs/stage1")
    assert (s3.resolution, s3.batch_size, s3.steps, s3.downsample) == (1024, 256, 42_000, True)
    assert s3.init_from == "runs/stage2"
    assert {s.optim.lr for s in (s1, s2, s3)} == {1e-4} and s1.cfg_dropout == 0.1
    assert s1.model == "meissonic-1b" and s1.text.checkpoint and not s1.text.tiny
    assert (s1.sample.steps, s1.sample.cfg) == (48, 9.0)


def test_debug_stage_needs_no_checkpoint():
    d = load_stage("debug", REPO_PIPELINES)
    assert d.model == "debug" and d.resolution is None and d.text.tiny and d.init_from is None


def test_overrides_win_and_unknown_keys_fail():
    cfg = load_stage("stage1", REPO_PIPELINES, {"steps": 7, "optim": {"lr": 3e-4}, "data": {"path": "x"}})
    assert cfg.steps == 7 and cfg.optim.lr == 3e-4 and cfg.optim.weight_decay == 0.01 and cfg.data.path == "x"
    with pytest.raises(ConfigError, match="unknown key 'stepz'"):
        load_stage("debug", REPO_PIPELINES, {"stepz": 1})
    with pytest.raises(ConfigError, match="unknown stage 'stage9'.*debug, stage1"):
        load_stage("stage9", REPO_PIPELINES)


def test_validation_messages():
    with pytest.raises(ValueError, match="multiple of log_every"):
        StageConfig(log_every=10, ckpt_every=15)
    with pytest.raises(ValueError, match="micro_batch_size"):
        StageConfig(batch_size=8, micro_batch_size=16)
    with pytest.raises(ConfigError, match="text.checkpoint is required"):
        load_stage("stage1", REPO_PIPELINES, {"text": {"checkpoint": ""}})


def test_plan_stage1():
    out = plan_stage(load_stage("stage1", REPO_PIPELINES), gpus=64, gpu="h100", mfu=0.4)
    assert out["grid"] == "16x16" and out["gpus"] == 64 and out["gpu_days"] > 0
    assert out["wall_days"] == pytest.approx(out["gpu_days"] / 64)
    with pytest.raises(ConfigError, match="fixed resolution"):
        plan_stage(load_stage("debug", REPO_PIPELINES), 1, "h100", 0.4)
