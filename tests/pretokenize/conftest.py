"""Fixtures for pretokenize tests: small webdataset image shards like img2dataset's and a tiny
random VQ (same class as the real one) saved to disk, loaded back through core.vq.load_vq."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from core import vq as V
from core.imageshard import Sample, write_shard

RES = 32  # test resolution; the tiny VQ is f4 -> 8x8 grids


def synthetic_image(rng: np.random.Generator, w: int, h: int) -> np.ndarray:
    """A smooth picture (gradient background + a few flat rectangles), (h, w, 3) uint8."""
    yy, xx = np.mgrid[0:h, 0:w] / max(w, h)
    base = np.stack([xx, yy, 1 - xx], -1) * rng.uniform(80, 200, 3) + rng.uniform(0, 50, 3)
    for _ in range(3):
        x0, y0 = rng.integers(0, w - 4), rng.integers(0, h - 4)
        base[y0: y0 + rng.integers(4, h // 2 + 5), x0: x0 + rng.integers(4, w // 2 + 5)] = rng.uniform(0, 255, 3)
    return np.clip(base, 0, 255).astype(np.uint8)


def encode(pixels: np.ndarray, fmt: str = "JPEG", **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, fmt, **kw)
    return buf.getvalue()


def make_shard(path: Path, shard_id: int, n: int, seed: int, bad: tuple[int, ...] = ()) -> list[Sample]:
    """n samples with keys as img2dataset makes them (shard id + index), mixed formats and sizes;
    indices in `bad` get undecodable image bytes."""
    rng = np.random.default_rng(seed)
    fmts = [("jpg", "JPEG"), ("png", "PNG"), ("webp", "WEBP")]
    samples = []
    for i in range(n):
        w, h = int(rng.integers(RES, 3 * RES)), int(rng.integers(RES, 3 * RES))
        ext, fmt = fmts[i % 3]
        data = b"\xff\xd8 not really a jpeg" if i in bad else encode(synthetic_image(rng, w, h), fmt)
        meta = {"url": f"http://x/{i}", "AESTHETIC_SCORE": 5.0 + i / 10, "pwatermark": 0.1, "punsafe": 0.01,
                "original_width": w * 4, "original_height": h * 4, "long_caption": f"a long caption {i}"}
        samples.append(Sample(f"{shard_id:05d}{i:04d}", data, ext, f"caption {shard_id}/{i}", meta))
    write_shard(path / f"{shard_id:05d}.tar", samples)
    return samples


@pytest.fixture(scope="session")
def shards(tmp_path_factory) -> Path:
    """Two shards of 7 samples; sample 3 of shard 0 is undecodable."""
    folder = tmp_path_factory.mktemp("shards")
    make_shard(folder, 0, 7, seed=0, bad=(3,))
    make_shard(folder, 1, 7, seed=1)
    return folder


def seeded_tiny_vq(seed: int = 0, codebook: int = 64) -> torch.nn.Module:
    """Tiny random f4 VQ whose codebook is seeded from encoder outputs of synthetic images, so
    codes spread over the codebook (a random codebook maps nearly everything to one code)."""
    vq = V.build_vq(V.tiny_vq_config(codebook=codebook, downsample=4, width=8), seed=seed)
    rng = np.random.default_rng(seed)
    x = torch.from_numpy(np.stack([synthetic_image(rng, RES, RES) for _ in range(16)])).permute(0, 3, 1, 2) / 255
    with torch.no_grad():
        z = vq.encode(x).latents.permute(0, 2, 3, 1).reshape(-1, vq.quantize.vq_embed_dim)
        vq.quantize.embedding.weight.copy_(z[torch.randperm(len(z), generator=torch.Generator().manual_seed(seed))[:codebook]])
    return vq


@pytest.fixture(scope="session")
def vq_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("vq") / "vqvae"
    V.save_vq(seeded_tiny_vq(), path)
    return path


@pytest.fixture(scope="session")
def shard_maker():
    """`make_shard(folder, shard_id, n, seed, bad=())` for tests that build their own shards."""
    return make_shard
