"""pretokenize.fitvq: the fitted model is a VQModel in the released folder format, it learns,
and dead codes are re-seeded."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from core.vq import encode_codes, load_vq
from pretokenize.fitvq import FitVQConfig, fit_vq, random_batch, reseed_codes


def test_fit_reduces_loss_and_saves_loadable(tmp_path, shards):
    cfg = FitVQConfig(codebook=32, downsample=4, steps=6, res=16, batch_size=4, width=8, restart_every=3, lr=3e-3)
    report = fit_vq(cfg, shards, tmp_path / "vq")
    vq = load_vq(tmp_path / "vq")
    assert (tmp_path / "vq" / "fit_report.json").is_file()
    assert report["images"] == 13  # the undecodable sample is skipped
    assert report["final_loss"] < 0.2 and np.isfinite(report["psnr"])
    codes = encode_codes(vq, torch.rand(2, 3, 16, 16))
    assert codes.shape == (2, 4, 4) and int(codes.max()) < 32


def test_reseed_codes_overwrites_only_dead_rows():
    emb = torch.zeros(6, 3)
    vectors = torch.arange(12, dtype=torch.float32).reshape(4, 3)
    n = reseed_codes(emb, torch.tensor([1, 4]), vectors, torch.Generator().manual_seed(0))
    assert n == 2 and torch.all(emb[[0, 2, 3, 5]] == 0)
    for row in emb[[1, 4]]:
        assert torch.min((vectors - row).abs().max(dim=1).values) < 0.01


def test_random_batch_shape_and_range():
    images = [np.full((20, 30, 3), 200, np.uint8), np.zeros((16, 16, 3), np.uint8)]
    x = random_batch(images, 5, 16, np.random.default_rng(0))
    assert x.shape == (5, 3, 16, 16) and 0 <= float(x.min()) and float(x.max()) <= 1


def test_config_validation():
    with pytest.raises(ValueError, match="multiple of downsample"):
        FitVQConfig(res=30, downsample=8)
    with pytest.raises(ValueError, match="power of 2"):
        FitVQConfig(downsample=6)


def test_images_load_in_key_order_whatever_the_tar_order(tmp_path, shards):
    # img2dataset writes samples in download-completion order; the fit must not depend on it.
    from core.imageshard import iter_shard, write_shard
    from pretokenize.fitvq import load_images
    for tar in sorted(shards.glob("*.tar")):
        samples = list(iter_shard(tar))
        write_shard(tmp_path / "shuffled" / tar.name, samples[::-1])
    a, b = load_images(shards, 16, 100), load_images(tmp_path / "shuffled", 16, 100)
    assert len(a) == len(b) > 2 and all(np.array_equal(x, y) for x, y in zip(a, b))
