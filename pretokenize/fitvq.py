"""`pretokenize fit-vq`: fit a small diffusers VQModel on image shards, saved in the released
checkpoints' folder format (loadable by `core.vq.load_vq`, so by `pretokenize --vq`).

For demos, tests and domains with no checkpoint at hand; the real Meissonic tokenizer is a
146M-parameter VQ-GAN trained with perceptual and GAN losses, which this does not replace.

What makes a few minutes of CPU enough (bench/fitvq.py measures it):
- f4 and a narrow net (16-32-64 channels): 64 px images become 16x16 tokens, each code
  describing a 4x4 patch, which a 256-entry codebook can do to >= 28 dB on flat-colour
  images; at f8 even a perfect patch mean with bilinear upsampling reaches only ~22.6 dB there.
- training on random 32 px crops of the 64 px images, a quarter of the cost of whole images
  (the net is fully convolutional), then, for the last `full_steps`, on whole res x res images
  (as many pixels per step: batch_size * (crop / res)^2 images). GroupNorm's statistics are taken
  over the whole picture, so a net that only ever saw crops encodes whole images worse: seen
  28.3 dB on 32 px crops but 23.1 dB on the whole 64 px images; the last phase closes that.
- the codebook follows its assigned encoder outputs by exponential moving averages (k-means
  steps, VQ-VAE-2) instead of gradients; codes unused over `restart_every` steps are re-seeded
  from current encoder outputs, and the codebook starts from encoder outputs of real images;
- loss = MSE(reconstruction, x) + `commitment` * ||z - sg(z_q)||^2, straight-through gradients;
  Adam with a short linear warmup and a cosine decay to zero.
PSNR is measured on `holdout` images the fit never saw.
"""
from __future__ import annotations

import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from core import atomic
from core.imageshard import iter_shard, list_shards
from core.progress import make_progress
from core.vq import build_vq, save_vq, tiny_vq_config
from core.errors import UserError
from core.image import decode_rgb
from pretokenize.geometry import center_offset, resized_size
from pretokenize.preprocess import to_unit_tensor


@dataclass
class FitVQConfig:
    codebook: int = 256  # number of codes (256 beat 1,024 on both sets: 30.9 vs 29.8 dB shapes, 24.7 vs 23.9 photos)
    downsample: int = 4  # pixels per token side (power of 2): 64 px -> 16x16 tokens
    steps: int = 2500  # optimiser steps (with 1,024 codes 2,000 gave 26.3 dB on the shapes world, 2,500 29.8 dB; bench/fitvq.py)
    res: int = 64  # images are resized to shorter side = res; PSNR on res x res centre crops
    crop: int = 32  # training crop side (<= res, a multiple of downsample)
    batch_size: int = 16  # crops per step
    full_steps: int = 500  # the last steps train on whole res x res images (same pixels per step)
    lr: float = 2e-3  # peak Adam learning rate (cosine decay to 0 after the warmup)
    warmup_steps: int = 20  # linear warmup from 0 to lr
    width: int = 16  # channels of the first encoder block (later blocks up to 4x)
    codebook_decay: float = 0.99  # EMA decay of the codebook updates; 0 = learn codes by gradient
    commitment: float = 0.25  # weight of ||z - sg(z_q)||^2 (VQ-VAE's beta)
    restart_every: int = 10  # re-seed codes unused over this many steps (0 = never)
    holdout: int = 64  # images kept out of the fit to measure PSNR on (at most a quarter of them)
    max_images: int = 4096  # images held in memory (resized to shorter side = res)
    seed: int = 0  # weights init, sampling, crops
    threads: int = 0  # torch threads (0 = torch's default)

    def __post_init__(self) -> None:
        if self.downsample < 1 or self.downsample & (self.downsample - 1):
            raise ValueError(f"downsample must be a power of 2, got {self.downsample}")
        for name in ("res", "crop"):
            if getattr(self, name) % self.downsample:
                raise ValueError(f"{name} {getattr(self, name)} must be a multiple of downsample {self.downsample}")
        if self.crop > self.res:
            raise ValueError(f"crop {self.crop} must be <= res {self.res}")
        if min(self.codebook, self.steps, self.batch_size, self.max_images, self.width, self.lr) <= 0:
            raise ValueError("codebook, steps, batch_size, max_images, width and lr must be positive")
        if self.width % 8:
            raise ValueError(f"width must be a multiple of 8 (GroupNorm groups), got {self.width}")
        if self.codebook > 65536:
            raise ValueError("codebook must be <= 65536 (codes are stored as uint16)")
        if not 0 <= self.codebook_decay < 1:
            raise ValueError(f"codebook_decay must lie in [0, 1), got {self.codebook_decay}")
        if min(self.warmup_steps, self.restart_every, self.holdout, self.commitment, self.full_steps) < 0:
            raise ValueError("warmup_steps, restart_every, holdout, commitment and full_steps must be >= 0")

    def batch(self, step: int) -> tuple[int, int]:
        """(images, side) of optimiser step `step` (1-based): crops, then whole images."""
        if step <= self.steps - self.full_steps:
            return self.batch_size, self.crop
        return max(1, self.batch_size * self.crop ** 2 // self.res ** 2), self.res


MAX_ASPECT = 4  # a longer side beyond this many times the shorter is cut to it (centred)


def load_images(input: str | os.PathLike, res: int, limit: int,
                skipped: dict[str, int] | None = None) -> list[np.ndarray]:
    """Up to `limit` images from the shards, each resized to shorter side = res and its longer
    side cut to at most MAX_ASPECT * res (centred), (H, W, 3) uint8. Images that do not decode,
    or whose shorter side is under `res` (they would be upscaled), are left out and counted in
    `skipped` ("undecodable", "too_small").

    Taken in (shard, key) order, not tar order: img2dataset writes samples as its download
    threads finish them, so the same set of images arrives in a different order on each run,
    and the seeded fit would see different images (seen: two `make demo` runs, two VQs). One
    shard's encoded bytes are held at a time to sort them."""
    out: list[np.ndarray] = []
    skipped = {} if skipped is None else skipped
    for tar in list_shards(input):
        encoded = sorted((sample.key, sample.image) for sample in iter_shard(tar) if sample.image is not None)
        for _, data in encoded:
            try:
                img = decode_rgb(data)
            except Exception:  # fitting needs only enough good images: counted, not fatal
                skipped["undecodable"] = skipped.get("undecodable", 0) + 1
                continue
            if min(img.size) < res:
                skipped["too_small"] = skipped.get("too_small", 0) + 1
                continue
            w, h = img.size
            side = min(w, h) * MAX_ASPECT  # cut before resizing: a 20000x10 strip never becomes 128000x64
            if max(w, h) > side:
                left, top = (w - min(w, side)) // 2, (h - min(h, side)) // 2
                img = img.crop((left, top, left + min(w, side), top + min(h, side)))
            out.append(np.asarray(img.resize(resized_size(*img.size, res), 2)))  # 2 = BILINEAR
            if len(out) >= limit:
                return out
    return out


def split_holdout(images: list[np.ndarray], n: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """(fit, held out): n images spread evenly over the list (so over shards and sources),
    at most a quarter of them."""
    n = min(n, len(images) // 4)
    held = set(np.linspace(0, len(images) - 1, n).round().astype(int).tolist()) if n else set()
    return [im for i, im in enumerate(images) if i not in held], [images[i] for i in sorted(held)]


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


def center_batch(images: list[np.ndarray], res: int) -> torch.Tensor:
    """(N, 3, res, res) in [0, 1]: the centre crop of each image (as `pretokenize` crops)."""
    crops = []
    for img in images:
        top, left = center_offset(img.shape[0], res), center_offset(img.shape[1], res)
        crops.append(img[top: top + res, left: left + res])
    return to_unit_tensor(np.ascontiguousarray(np.stack(crops)))


def flat_latents(z: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) encoder outputs -> (B*h*w, C), the vectors the codebook quantizes."""
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


class EMACodebook:
    """Codebook updates by exponential moving averages of the encoder outputs assigned to each
    code (VQ-VAE-2, appendix A): code k = (decayed sum of its vectors) / (decayed count), a
    k-means step per batch, so codes follow the encoder without waiting for gradients."""

    def __init__(self, embedding: torch.Tensor, decay: float, eps: float = 1e-5) -> None:
        self.embedding, self.decay, self.eps = embedding, decay, eps  # (K, C), updated in place
        self.counts = torch.ones(embedding.shape[0])  # (K,) decayed assignment counts
        self.sums = embedding.detach().clone()  # (K, C) decayed sums of assigned vectors

    @torch.no_grad()
    def update(self, vectors: torch.Tensor, idx: torch.Tensor) -> None:
        """vectors (N, C) assigned to codes idx (N,)."""
        k = self.embedding.shape[0]
        self.counts.mul_(self.decay).add_(torch.bincount(idx, minlength=k).float(), alpha=1 - self.decay)
        self.sums.mul_(self.decay).index_add_(0, idx, vectors.detach(), alpha=1 - self.decay)
        n = self.counts.sum()
        smoothed = (self.counts + self.eps) / (n + k * self.eps) * n  # Laplace: no division by 0
        self.embedding.copy_(self.sums / smoothed[:, None])

    @torch.no_grad()
    def reseed(self, codes: torch.Tensor, vectors: torch.Tensor, rng: torch.Generator) -> int:
        n = reseed_codes(self.embedding, codes, vectors, rng)
        self.sums[codes], self.counts[codes] = self.embedding[codes], 1.0
        return n


def lr_factor(step: int, steps: int, warmup: int) -> float:
    """Multiplier of the peak lr at optimiser step `step` (1-based): linear warmup, cosine to 0."""
    if step <= warmup:
        return step / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of two images in [0, 1] (inf when identical)."""
    mse = float(torch.mean((a.float() - b.float()) ** 2))
    return math.inf if mse == 0 else 10.0 * math.log10(1.0 / mse)


def train_step(vq, opt, x: torch.Tensor, commitment: float,
               ema: EMACodebook | None) -> tuple[float, torch.Tensor, torch.Tensor]:
    """One step; returns (loss, flattened encoder outputs (B*h*w, C), code indices (B*h*w,))."""
    z = vq.encode(x).latents  # (B, C, h, w)
    z_q, codebook_loss, (_, _, idx) = vq.quantize(z)  # straight-through z_q
    rec = vq.decoder(vq.post_quant_conv(z_q), None)  # (B, 3, H, W)
    if ema is None:  # diffusers' loss: ||sg(z) - z_q||^2 + beta ||z - sg(z_q)||^2 (legacy=False)
        loss = torch.nn.functional.mse_loss(rec, x) + codebook_loss
    else:  # the codebook moves by EMA; only the commitment term pulls the encoder
        loss = torch.nn.functional.mse_loss(rec, x) + commitment * torch.mean((z - z_q.detach()) ** 2)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    vectors, idx = flat_latents(z.detach()), idx.reshape(-1)
    if ema is not None:
        ema.update(vectors, idx)
    return float(loss.detach()), vectors, idx


def build_fit_model(cfg: FitVQConfig):
    """The VQModel to fit: `core.vq.tiny_vq_config`'s architecture at this width and factor."""
    vq = build_vq(tiny_vq_config(cfg.codebook, cfg.downsample, cfg.width), cfg.seed).train()
    vq.quantize.legacy = False  # beta on the commitment term, 1 on the codebook term (VQ-VAE paper)
    vq.quantize.beta = cfg.commitment
    if cfg.codebook_decay:
        vq.quantize.embedding.weight.requires_grad_(False)
    return vq


def fit_vq(cfg: FitVQConfig, input: str | os.PathLike, output: str | os.PathLike) -> dict[str, Any]:
    """Fit, evaluate on held-out images, save to `output` (a new folder); returns the fit report."""
    output = Path(output)
    blocker = output if output.is_file() else atomic.file_in_the_way(output)
    if blocker is not None:
        raise UserError(f"{output}: cannot be the VQ folder: {blocker} is a file")
    if output.exists() and any(output.iterdir()):
        raise UserError(f"{output}: exists and is not empty; remove it or choose another --output")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    wall, cpu = time.perf_counter(), time.process_time()
    skipped: dict[str, int] = {}
    images = load_images(input, cfg.res, cfg.max_images, skipped)
    if len(images) < 2:
        left_out = f" ({', '.join(f'{n} {why}' for why, n in skipped.items())} left out)" if skipped else ""
        raise UserError(f"{input}: fewer than 2 decodable images with a shorter side of >= {cfg.res} px to fit "
                        f"a VQ on{left_out}; give more images or a smaller --res")
    fit, held = split_holdout(images, cfg.holdout)
    vq, loss, restarted = fit_loop(cfg, fit)
    report = evaluate(vq.eval().requires_grad_(False), held or fit[:64], cfg.res)
    report.update(steps=cfg.steps, images=len(fit), held_out_images=len(held), skipped_images=skipped,
                  restarted_codes=restarted,
                  final_loss=loss, seconds=round(time.perf_counter() - wall, 1),
                  cpu_seconds=round(time.process_time() - cpu, 1), threads=torch.get_num_threads())
    save_folder(vq, report, output)
    return report


def fit_loop(cfg: FitVQConfig, images: list[np.ndarray]):
    """(vq, last loss, codes re-seeded) after cfg.steps steps on random crops of `images`."""
    rng, grng = np.random.default_rng(cfg.seed), torch.Generator().manual_seed(cfg.seed)
    vq = build_fit_model(cfg)
    emb = vq.quantize.embedding.weight
    with torch.no_grad():  # seed the codebook from real encoder outputs
        reseed_codes(emb.data, torch.arange(cfg.codebook),
                     flat_latents(vq.encode(random_batch(images, 64, cfg.crop, rng)).latents), grng)
    ema = EMACodebook(emb.data, cfg.codebook_decay) if cfg.codebook_decay else None
    opt = torch.optim.Adam([p for p in vq.parameters() if p.requires_grad], lr=cfg.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: lr_factor(i + 1, cfg.steps, cfg.warmup_steps))
    usage, restarted, loss = torch.zeros(cfg.codebook, dtype=torch.long), 0, math.nan
    with make_progress() as progress:
        bar = progress.add_task("fit-vq", total=cfg.steps)
        for step in range(1, cfg.steps + 1):
            loss, vectors, idx = train_step(vq, opt, random_batch(images, *cfg.batch(step), rng), cfg.commitment, ema)
            sched.step()
            usage += torch.bincount(idx, minlength=cfg.codebook)
            if cfg.restart_every and step % cfg.restart_every == 0 and step < 0.9 * cfg.steps:
                dead = torch.nonzero(usage == 0).flatten()  # no restarts at the end: let codes settle
                restarted += ema.reseed(dead, vectors, grng) if ema else reseed_codes(emb.data, dead, vectors, grng)
                usage.zero_()
            progress.update(bar, advance=1, description=f"fit-vq loss {loss:.4f}")
    return vq, loss, restarted


@torch.no_grad()
def evaluate(vq, images: list[np.ndarray], res: int) -> dict[str, Any]:
    """Reconstruction MSE/PSNR and codes used on the res x res centre crops of `images`."""
    from core.vq import decode_codes, encode_codes

    x = center_batch(images, res)
    codes = encode_codes(vq, x)
    rec = decode_codes(vq, codes)
    mse = float(torch.mean((rec - x) ** 2))
    return {"recon_mse": mse, "psnr": psnr(rec, x), "codes_used": int(codes.unique().numel())}


def save_folder(vq, report: dict[str, Any], output: Path) -> None:
    """Weights + fit_report.json written into a temp folder renamed to `output` (crash-safe)."""
    tmp = atomic.temp_name(output)
    try:
        save_vq(vq, tmp)
        atomic.write_json(tmp / "fit_report.json", report)
        if output.exists():  # an empty folder (fit_vq refuses others)
            output.rmdir()
        os.replace(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
