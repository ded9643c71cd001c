"""`pretokenize fit-vq`: fit a small diffusers VQModel on image shards, saved in the released
checkpoints' folder format (loadable by `core.vq.load_vq`, so by `pretokenize --vq`).

For demos, tests and domains with no checkpoint at hand; the real Meissonic tokenizer is a
146M-parameter VQ-GAN trained with perceptual and GAN losses, which this does not replace.

Training: loss = MSE(reconstruction, x) + the quantizer's codebook/commitment loss
(diffusers VectorQuantizer with legacy=False, the VQ-VAE weighting: ||z_q - sg(z)||^2 moves the
codebook, 0.25 ||z - sg(z_q)||^2 commits the encoder), gradients through the
quantizer straight-through. The codebook starts from encoder outputs of real images (k-means++
style seeding by sampling) and codes unused over `restart_every` steps are re-seeded from
current encoder outputs, so the codebook does not collapse.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from core import atomic
from core.imageshard import iter_shard, list_shards
from core.progress import make_progress
from core.vq import build_vq, save_vq, tiny_vq_config
from core.image import decode_rgb
from pretokenize.geometry import resized_size
from pretokenize.preprocess import to_unit_tensor


@dataclass
class FitVQConfig:
    codebook: int = 1024  # number of codes
    downsample: int = 8  # pixels per token side (power of 2)
    steps: int = 300  # optimiser steps
    res: int = 64  # training crop side in pixels (a multiple of downsample)
    batch_size: int = 16  # images per step
    lr: float = 1e-3  # Adam learning rate
    width: int = 32  # channels of the first encoder block (later blocks up to 4x)
    max_images: int = 2048  # images held in memory (resized to shorter side = res)
    restart_every: int = 10  # re-seed codes unused over this many steps (0 = never)
    seed: int = 0  # weights init, sampling, crops
    threads: int = 0  # torch threads (0 = torch's default)

    def __post_init__(self) -> None:
        if self.downsample < 1 or self.downsample & (self.downsample - 1):
            raise ValueError(f"downsample must be a power of 2, got {self.downsample}")
        if self.res % self.downsample:
            raise ValueError(f"res {self.res} must be a multiple of downsample {self.downsample}")
        if min(self.codebook, self.steps, self.batch_size, self.max_images, self.width) <= 0:
            raise ValueError("codebook, steps, batch_size, max_images and width must be positive")
        if self.width % 8:
            raise ValueError(f"width must be a multiple of 8 (GroupNorm groups), got {self.width}")
        if self.codebook > 65536:
            raise ValueError("codebook must be <= 65536 (codes are stored as uint16)")


def load_images(input: str | os.PathLike, res: int, limit: int) -> list[np.ndarray]:
    """Up to `limit` images from the shards, each resized to shorter side = res, (H, W, 3) uint8.

    Taken in (shard, key) order, not tar order: img2dataset writes samples as its download
    threads finish them, so the same set of images arrives in a different order on each run,
    and the seeded fit would see different images (seen: two `make demo` runs, two VQs). One
    shard's encoded bytes are held at a time to sort them."""
    out: list[np.ndarray] = []
    for tar in list_shards(input):
        encoded = sorted((sample.key, sample.image) for sample in iter_shard(tar) if sample.image is not None)
        for _, data in encoded:
            try:
                img = decode_rgb(data)
            except Exception:  # skip undecodable images: fitting needs only enough good ones
                continue
            out.append(np.asarray(img.resize(resized_size(*img.size, res), 2)))  # 2 = BILINEAR
            if len(out) >= limit:
                return out
    return out


def random_batch(images: list[np.ndarray], n: int, res: int, rng: np.random.Generator) -> torch.Tensor:
    """(n, 3, res, res) in [0, 1]: random images, random crops, random horizontal flips."""
    crops = []
    for i in rng.integers(0, len(images), n):
        img = images[i]
        top = int(rng.integers(0, img.shape[0] - res + 1))
        left = int(rng.integers(0, img.shape[1] - res + 1))
        crop = img[top: top + res, left: left + res]
        crops.append(crop[:, ::-1] if rng.random() < 0.5 else crop)
    return to_unit_tensor(np.ascontiguousarray(np.stack(crops)))


def flat_latents(vq, x: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) -> (B*h*w, C) encoder outputs, the vectors the codebook quantizes."""
    z = vq.encode(x).latents  # (B, C, h, w)
    return z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])


def reseed_codes(embedding: torch.Tensor, codes: torch.Tensor, vectors: torch.Tensor,
                 rng: torch.Generator) -> int:
    """Overwrite rows `codes` of `embedding` (K, C) with random rows of `vectors` (N, C)."""
    if len(codes) == 0:
        return 0
    pick = torch.randint(0, len(vectors), (len(codes),), generator=rng)
    noise = 1e-3 * torch.randn(len(codes), vectors.shape[1], generator=rng)
    embedding[codes] = vectors[pick].detach() + noise
    return len(codes)


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of two images in [0, 1] (inf when identical)."""
    mse = float(torch.mean((a.float() - b.float()) ** 2))
    return math.inf if mse == 0 else 10.0 * math.log10(1.0 / mse)


def train_step(vq, opt, x: torch.Tensor) -> tuple[float, torch.Tensor]:
    """One step; returns (loss, code indices used (B*h*w,))."""
    z = vq.encode(x).latents  # (B, C, h, w)
    z_q, vq_loss, (_, _, idx) = vq.quantize(z)  # straight-through z_q
    rec = vq.decoder(vq.post_quant_conv(z_q), None)  # (B, 3, H, W)
    loss = torch.nn.functional.mse_loss(rec, x) + vq_loss
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return float(loss.detach()), idx.reshape(-1)


def fit_vq(cfg: FitVQConfig, input: str | os.PathLike, output: str | os.PathLike) -> dict[str, Any]:
    """Fit, evaluate on held-out crops, save to `output`; returns the fit report."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    images = [im for im in load_images(input, cfg.res, cfg.max_images) if min(im.shape[:2]) >= cfg.res]
    if len(images) < 2:
        raise FileNotFoundError(f"{input}: fewer than 2 decodable images to fit a VQ on")
    rng, grng = np.random.default_rng(cfg.seed), torch.Generator().manual_seed(cfg.seed)
    vq = build_vq(tiny_vq_config(cfg.codebook, cfg.downsample, cfg.width), cfg.seed).train()
    vq.quantize.legacy = False  # beta (0.25) on the commitment term, 1 on the codebook term (VQ-VAE paper)
    emb = vq.quantize.embedding.weight
    with torch.no_grad():  # seed the codebook from real encoder outputs
        reseed_codes(emb.data, torch.arange(cfg.codebook), flat_latents(vq, random_batch(images, 64, cfg.res, rng)), grng)
    opt = torch.optim.Adam(vq.parameters(), lr=cfg.lr)
    usage, restarted = torch.zeros(cfg.codebook, dtype=torch.long), 0
    with make_progress() as progress:
        bar = progress.add_task("fit-vq", total=cfg.steps)
        for step in range(1, cfg.steps + 1):
            x = random_batch(images, cfg.batch_size, cfg.res, rng)
            loss, idx = train_step(vq, opt, x)
            usage += torch.bincount(idx, minlength=cfg.codebook)
            if cfg.restart_every and step % cfg.restart_every == 0 and step < cfg.steps:
                with torch.no_grad():
                    restarted += reseed_codes(emb.data, torch.nonzero(usage == 0).flatten(), flat_latents(vq, x), grng)
                usage.zero_()
            progress.update(bar, advance=1, description=f"fit-vq loss {loss:.4f}")
    report = evaluate(vq.eval().requires_grad_(False), images, cfg, rng)
    report.update(steps=cfg.steps, images=len(images), restarted_codes=restarted, final_loss=loss)
    save_vq(vq, output)
    atomic.write_json(Path(output) / "fit_report.json", report)
    return report


@torch.no_grad()
def evaluate(vq, images: list[np.ndarray], cfg: FitVQConfig, rng: np.random.Generator) -> dict[str, Any]:
    """Reconstruction MSE/PSNR and codebook use on 64 random crops."""
    from core.vq import decode_codes, encode_codes

    x = random_batch(images, 64, cfg.res, rng)
    codes = encode_codes(vq, x)
    rec = decode_codes(vq, codes)
    mse = float(torch.mean((rec - x) ** 2))
    return {"recon_mse": mse, "psnr": psnr(rec, x), "codes_used": int(codes.unique().numel())}
