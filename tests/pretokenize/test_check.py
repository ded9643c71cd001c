"""pretokenize.check: usage maths, dead/collapsed warnings, originals vs decoded-only."""
from __future__ import annotations

import math
import shutil

import numpy as np
import pytest

from core.codeshard import CodeShardError
from core.vq import build_vq, save_vq, tiny_vq_config
from pretokenize.check import CheckConfig, psnr, run_check, spread, usage_stats, usage_warnings
from pretokenize.run import PretokenizeConfig, run

RES = 32


def test_usage_stats_entropy():
    u = usage_stats(np.array([5, 5, 5, 5, 0, 0, 0, 0]))
    assert u["codes_used"] == 4 and u["entropy_bits"] == pytest.approx(2.0)
    assert u["max_entropy_bits"] == pytest.approx(3.0)
    assert usage_stats(np.zeros(4, dtype=np.int64))["entropy_bits"] == 0.0


def test_warnings_dead_and_collapsed():
    cfg = CheckConfig()
    healthy = usage_stats(np.full(64, 10))
    assert usage_warnings(healthy, cfg) == []
    counts = np.zeros(8192, dtype=np.int64)
    counts[:3] = [100000, 10, 10]
    warns = usage_warnings(usage_stats(counts), cfg)
    assert any(w.startswith("dead codebook: 3 of 8192") for w in warns)
    assert any(w.startswith("collapsed codebook") for w in warns)
    # 256 tokens can reach only 256 codes: 200 used is healthy, not "dead"
    few = np.zeros(8192, dtype=np.int64)
    few[:200] = 1
    few[200] = 56
    assert usage_warnings(usage_stats(few), cfg) == []


def test_psnr_and_spread():
    a = np.zeros((4, 4, 3), np.uint8)
    assert psnr(a, a) == math.inf
    assert psnr(a, a + 255) == pytest.approx(0.0)
    assert list(spread(10, 3)) == [0, 4, 9]
    assert list(spread(2, 16)) == [0, 1]


def test_decoded_only_when_source_is_gone(tmp_path, shard_maker, vq_dir):
    src = tmp_path / "src"
    src.mkdir()
    shard_maker(src, 0, 4, seed=5)
    out = tmp_path / "codes"
    run(PretokenizeConfig(res=RES, vq=str(vq_dir), batch_size=4, executor="local", cpus_per_actor=1), src, out)
    shutil.rmtree(src)
    report = run_check(CheckConfig(n=2), out)
    assert report["compared"] == 0 and report["decoded_only"] == 2 and report["mean_psnr"] is None
    assert report["samples"][0]["kind"].startswith("reconstruction only")


def test_refuses_another_tokenizer(tmp_path, shards, vq_dir):
    out = tmp_path / "codes"
    run(PretokenizeConfig(res=RES, vq=str(vq_dir), batch_size=8, executor="local", cpus_per_actor=1), shards, out)
    other = tmp_path / "other"
    save_vq(build_vq(tiny_vq_config(codebook=64, downsample=4, width=8), seed=99), other)
    with pytest.raises(CodeShardError, match="is not the one that made"):
        run_check(CheckConfig(n=2, vq=str(other)), out)
