"""pretokenize.fitvq: the fitted model is a VQModel in the released folder format, it learns,
its default recipe runs end to end (EMA codebook, held-out PSNR), dead codes are re-seeded."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from core.errors import UserError
from core.vq import encode_codes, load_vq
from pretokenize.fitvq import (EMACodebook, FitVQConfig, fit_vq, lr_factor, random_batch, reseed_codes,
                               split_holdout)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_fit_reduces_loss_and_saves_loadable(tmp_path, shards):
    cfg = FitVQConfig(codebook=32, downsample=4, steps=6, res=16, crop=16, batch_size=4, width=8,
                      restart_every=3, lr=3e-3, warmup_steps=2, codebook_decay=0.0)
    report = fit_vq(cfg, shards, tmp_path / "vq")
    vq = load_vq(tmp_path / "vq")
    assert json.loads((tmp_path / "vq" / "fit_report.json").read_text())["psnr"] == report["psnr"]
    assert report["images"] + report["held_out_images"] == 13  # the undecodable sample is skipped
    assert report["held_out_images"] == 3  # at most a quarter of the images
    assert report["final_loss"] < 0.2 and np.isfinite(report["psnr"])
    codes = encode_codes(vq, torch.rand(2, 3, 16, 16))
    assert codes.shape == (2, 4, 4) and int(codes.max()) < 32
    assert not list(tmp_path.glob("_tmp.*"))  # written through a temp folder, renamed


def test_default_recipe_runs(tmp_path, shards):
    # Every default but the step counts: f4, 64 px, 32 px crops then whole images, EMA codebook.
    cfg = FitVQConfig(steps=3, full_steps=1)
    report = fit_vq(cfg, shards, tmp_path / "vq")
    vq = load_vq(tmp_path / "vq")
    assert vq.config.num_vq_embeddings == 256 and encode_codes(vq, torch.rand(1, 3, 64, 64)).shape == (1, 16, 16)
    assert report["steps"] == 3 and report["cpu_seconds"] > 0
    # the fixture's images are 16-48 px: those under 64 px are not upscaled into the fit
    assert report["images"] + report["held_out_images"] + sum(report["skipped_images"].values()) == 14
    assert report["skipped_images"]["undecodable"] == 1 and report["skipped_images"]["too_small"] > 0


def test_refuses_a_non_empty_output(tmp_path, shards):
    (tmp_path / "vq").mkdir()
    (tmp_path / "vq" / "keep.txt").write_text("mine")
    with pytest.raises(UserError, match="not empty"):
        fit_vq(FitVQConfig(steps=1), shards, tmp_path / "vq")
    assert (tmp_path / "vq" / "keep.txt").read_text() == "mine"


def test_ema_codebook_moves_codes_to_the_mean_of_their_vectors():
    emb = torch.zeros(3, 2)
    ema = EMACodebook(emb, decay=0.0)
    vectors = torch.tensor([[1.0, 1.0], [3.0, 3.0], [5.0, -1.0], [7.0, 0.0]])
    ema.update(vectors, torch.tensor([0, 0, 2, 2]))
    assert torch.allclose(emb[0], torch.tensor([2.0, 2.0]), atol=1e-3)
    assert torch.allclose(emb[2], torch.tensor([6.0, -0.5]), atol=1e-3)
    assert torch.allclose(emb[1], torch.zeros(2))  # unused: the dead-code restart's job
    slow = EMACodebook(torch.zeros(1, 2), decay=0.5)  # starts at count 1, sum 0
    slow.update(torch.tensor([[4.0, 4.0]]), torch.tensor([0]))
    assert torch.allclose(slow.embedding[0], torch.tensor([2.0, 2.0]), atol=1e-3)  # (0.5*0 + 0.5*4) / (0.5 + 0.5)


def test_crops_then_whole_images_with_as_many_pixels():
    cfg = FitVQConfig(steps=100, full_steps=10, res=64, crop=32, batch_size=16)
    assert cfg.batch(1) == cfg.batch(90) == (16, 32)
    assert cfg.batch(91) == cfg.batch(100) == (4, 64)


def test_lr_factor_warms_up_then_decays_to_zero():
    assert lr_factor(1, 100, 10) == pytest.approx(0.1) and lr_factor(10, 100, 10) == pytest.approx(1.0)
    assert lr_factor(55, 100, 10) == pytest.approx(0.5) and lr_factor(100, 100, 10) == pytest.approx(0.0)


def test_split_holdout_spreads_and_caps():
    images = [np.full((2, 2, 3), i, np.uint8) for i in range(40)]
    fit, held = split_holdout(images, 64)
    assert len(held) == 10 and len(fit) == 30  # a quarter at most
    assert [int(h[0, 0, 0]) for h in held][:3] == [0, 4, 9] and int(held[-1][0, 0, 0]) == 39
    assert not {int(h[0, 0, 0]) for h in held} & {int(f[0, 0, 0]) for f in fit}


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
    with pytest.raises(ValueError, match="crop 64 must be <= res 32"):
        FitVQConfig(res=32, crop=64)
    with pytest.raises(ValueError, match="codebook_decay"):
        FitVQConfig(codebook_decay=1.0)


def test_images_load_in_key_order_whatever_the_tar_order(tmp_path, shards):
    # img2dataset writes samples as download threads finish them; the fit must not depend on it.
    from core.imageshard import iter_shard, write_shard
    from pretokenize.fitvq import load_images
    for tar in sorted(shards.glob("*.tar")):
        samples = list(iter_shard(tar))
        write_shard(tmp_path / "shuffled" / tar.name, samples[::-1])
    a, b = load_images(shards, 16, 100), load_images(tmp_path / "shuffled", 16, 100)
    assert len(a) == len(b) > 2 and all(np.array_equal(x, y) for x, y in zip(a, b))


def test_images_too_small_or_undecodable_are_left_out_and_strips_cut(tmp_path):
    import io

    from PIL import Image

    from core.imageshard import Sample, write_shard
    from pretokenize.fitvq import MAX_ASPECT, load_images

    def png(w: int, h: int) -> bytes:
        buf = io.BytesIO()
        Image.new("RGB", (w, h), (10, 200, 30)).save(buf, "PNG")
        return buf.getvalue()

    sizes = [(1, 1), (8, 8), (2000, 16), (40, 20), (16, 16)]
    samples = [Sample(f"{i:09d}", png(w, h), "png", "c", {}) for i, (w, h) in enumerate(sizes)]
    write_shard(tmp_path / "in" / "00000.tar", [*samples, Sample("000000009", b"not an image", "jpg", "c", {})])
    skipped: dict[str, int] = {}
    images = load_images(tmp_path / "in", 16, 100, skipped)
    assert skipped == {"too_small": 2, "undecodable": 1}  # 1x1 and 8x8 are not upscaled
    assert [im.shape for im in images] == [(16, 16 * MAX_ASPECT, 3), (16, 32, 3), (16, 16, 3)]  # the strip cut
    with pytest.raises(UserError, match=r"fewer than 2 decodable images .* \(5 too_small, 1 undecodable left out\)"):
        fit_vq(FitVQConfig(res=64, crop=32), tmp_path / "in", tmp_path / "vq")
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="is a file"):
        fit_vq(FitVQConfig(), tmp_path / "in", tmp_path / "file" / "vq")
