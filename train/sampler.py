"""MaskGIT decoding with classifier-free guidance, and sample grids.

Start fully masked; at step i of S: predict every position, sample a code for each masked one,
score it by its log-probability plus Gumbel noise of temperature T_i = T0 * (1 - (i+1)/S)
(annealed from T0 = 2 to 0), keep the most confident and re-mask the rest so that
floor(L * cos(pi/2 * (i+1)/S)) positions stay masked (the training schedule, `mask_rate`).
The model's condition input comes from the run's convention (`train/convention.py`): for runs
trained here `masking.cond_value` of the fraction still masked, the function the trainer uses;
for the released weights the step index counting down, as upstream's pipeline feeds it.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image

from core import atomic
from core.progress import make_progress
from train.convention import CONVENTIONS, Convention
from train.masking import mask_rate

DEFAULT_SCORE = 6.0  # aesthetic micro-condition of upstream's pipeline (`micro_conditioning_aesthetic_score`)
PRECISION_DTYPES = {"bf16": torch.bfloat16, "fp32": None}  # a checkpoint's recorded precision -> autocast dtype


def remask_count(num_tokens: int, step: int, steps: int, masked_now: torch.Tensor) -> torch.Tensor:
    """How many positions stay masked after step `step` (0-based): floor(L * cos(pi/2 (i+1)/S)),
    at most masked_now - 1 (each step reveals >= 1 token), 0 after the last step. (B,) long."""
    if step == steps - 1:
        return torch.zeros_like(masked_now)
    target = math.floor(num_tokens * mask_rate((step + 1) / steps))
    return torch.clamp(torch.full_like(masked_now, target), max=masked_now - 1).clamp(min=0)


def gumbel_temperature(step: int, steps: int, start: float = 2.0) -> float:
    """Confidence-noise temperature, annealed linearly from `start` to 0 over the steps."""
    return start * (1 - (step + 1) / steps)


def choose_remask(confidence: torch.Tensor, keep_masked: torch.Tensor, temperature: float,
                  generator: torch.Generator | None) -> torch.Tensor:
    """confidence (B, L) (+inf where already known), keep_masked (B,) -> (B, L) bool: the
    keep_masked[b] lowest of confidence + temperature * Gumbel noise."""
    u = torch.rand(confidence.shape, generator=generator, device=confidence.device).clamp(1e-20, 1 - 1e-7)
    noisy = confidence + temperature * -torch.log(-torch.log(u))
    ranks = noisy.argsort(dim=1).argsort(dim=1)
    return ranks < keep_masked[:, None]


def guided_logits(model, codes, hidden, pooled, neg_hidden, neg_pooled, micro, timestep, scale: float):
    """uncond + scale * (cond - uncond), one batched forward for both branches. (B, L, K) fp32."""
    if scale == 1.0:
        return model(codes, hidden, pooled, micro, timestep).float()
    both = model(
        torch.cat([codes, codes]), torch.cat([hidden, neg_hidden]), torch.cat([pooled, neg_pooled]),
        torch.cat([micro, micro]), torch.cat([timestep, timestep]),
    ).float()
    cond, uncond = both.chunk(2)
    return uncond + scale * (cond - uncond)


@torch.no_grad()
def maskgit(model, hidden: torch.Tensor, pooled: torch.Tensor, neg_hidden: torch.Tensor,
            neg_pooled: torch.Tensor, micro_conds: torch.Tensor, grid: tuple[int, int], steps: int = 48,
            cfg: float = 9.0, seed: int = 0, temperature: float = 2.0,
            convention: Convention = CONVENTIONS["tessera"], dtype: torch.dtype = torch.float32,
            on_step: Callable[[], None] | None = None) -> torch.Tensor:
    """Generate (B, h, w) codes. hidden (B, T, D), pooled (B, P); negatives broadcast from (1, ...).
    dtype: the forward's compute dtype, in which the released convention hands over its timestep;
    on_step: called after each decoding step (a progress bar)."""
    mcfg = model.cfg
    b, (h, w), device = hidden.shape[0], grid, hidden.device
    length, mask_id = h * w, mcfg.mask_token_id
    gen = torch.Generator(device=device).manual_seed(seed)
    neg_hidden, neg_pooled = neg_hidden.expand(b, -1, -1), neg_pooled.expand(b, -1)
    codes = torch.full((b, length), mask_id, dtype=torch.long, device=device)
    for i in range(steps):
        masked = codes == mask_id  # (B, L)
        timestep = convention.sample_timestep(i, steps, masked.float().mean(1), dtype)
        logits = guided_logits(model, codes.view(b, h, w), hidden, pooled, neg_hidden, neg_pooled,
                               micro_conds, timestep, cfg)  # (B, L, K)
        logp = torch.log_softmax(logits, dim=-1)
        drawn = torch.multinomial(logp.exp().view(-1, logp.shape[-1]), 1, generator=gen).view(b, length)
        drawn = torch.where(masked, drawn, codes)
        confidence = torch.where(masked, logp.gather(-1, drawn[..., None])[..., 0], torch.inf)
        keep = remask_count(length, i, steps, masked.sum(1))
        remask = choose_remask(confidence, keep, gumbel_temperature(i, steps, temperature), gen)
        codes = torch.where(remask, torch.full_like(drawn, mask_id), drawn)
        if on_step is not None:
            on_step()
    return codes.view(b, h, w)


def square_micro_conds(resolution: int, score: float = DEFAULT_SCORE) -> list[float]:
    """[orig_w, orig_h, crop_top, crop_left, score] of an uncropped square image: what upstream's
    pipeline feeds (width, height, crop (0, 0), aesthetic 6), so the released weights' default."""
    return [float(resolution), float(resolution), 0.0, 0.0, float(score)]


@torch.no_grad()
def generate(model, text_encoder, prompts: list[str], grid: tuple[int, int], micro_conds: list[float],
             steps: int = 48, cfg: float = 9.0, negative_prompt: str = "", seed: int = 0,
             convention: Convention = CONVENTIONS["tessera"], autocast: torch.dtype | None = None,
             on_step: Callable[[], None] | None = None) -> torch.Tensor:
    """Prompts -> (N, h, w) codes; the negative prompt "" means the empty-prompt encoding.

    micro_conds: the 5 micro-conditions every image gets (a run records its data's typical ones);
    convention: the model's timestep inputs; autocast: the model's compute dtype (None = fp32).
    The text encoder brings its own padding and precision (``TextEncoder.configure``)."""
    device = next(model.parameters()).device
    hidden, pooled = text_encoder.encode(prompts)
    neg = text_encoder.empty() if not negative_prompt else text_encoder.encode([negative_prompt])
    micro = torch.tensor([micro_conds], dtype=torch.float32, device=device).repeat(len(prompts), 1)  # (N, 5)
    with torch.autocast(device.type, dtype=autocast or torch.float32, enabled=autocast is not None):
        return maskgit(model, hidden.to(device), pooled.to(device), neg[0].to(device), neg[1].to(device),
                       micro, grid, steps=steps, cfg=cfg, seed=seed, convention=convention,
                       dtype=autocast or torch.float32, on_step=on_step)


def codes_to_colors(codes: torch.Tensor, codebook_size: int, scale: int = 8) -> torch.Tensor:
    """False-colour view of (B, h, w) codes -> (B, 3, h*scale, w*scale) in [0, 1]: each code id
    gets a fixed random colour (for runs without a VQ decoder, e.g. the debug stage)."""
    palette = torch.rand(codebook_size, 3, generator=torch.Generator().manual_seed(0))
    img = palette[codes.cpu().clamp(0, codebook_size - 1)].permute(0, 3, 1, 2)  # (B, 3, h, w)
    return img.repeat_interleave(scale, dim=2).repeat_interleave(scale, dim=3)


def decode_vq(vq, codes: torch.Tensor) -> torch.Tensor:
    """(B, h, w) codes -> (B, 3, H, W) pixels in [0, 1] with the VQ decoder (core.vq)."""
    from core.vq import decode_codes

    return decode_codes(vq, codes)


def save_grid(images: torch.Tensor, path: str | Path, nrow: int | None = None) -> Path:
    """(N, 3, H, W) floats in [0, 1] -> one PNG, near-square grid, written atomically."""
    n, _, h, w = images.shape
    nrow = nrow or math.ceil(math.sqrt(n))
    rows = math.ceil(n / nrow)
    canvas = np.zeros((rows * h, nrow * w, 3), dtype=np.uint8)
    pixels = (images.detach().float().clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).cpu().numpy()
    for i in range(n):
        r, c = divmod(i, nrow)
        canvas[r * h : (r + 1) * h, c * w : (c + 1) * w] = pixels[i]
    path = Path(path)
    with atomic.atomic_path(path) as tmp:
        Image.fromarray(canvas).save(tmp, format="PNG")
    return path


def load_for_sampling(ckpt: str | Path, ema: bool | None = None, device: str | torch.device = "cpu"):
    """(model, text encoder, meta) rebuilt from a checkpoint folder, a run folder's latest, or a
    Meissonic release folder (`train/release.py`), each with its own sampling conventions: meta's
    `convention`, `precision` and `sample_micro_conds`, the encoder configured to match.
    ema: the checkpoint's EMA weights (True), its raw weights (False), or None: the EMA weights
    when the run kept them (what a run with EMA on keeps them for), else the raw ones; meta's
    `weights` says which were loaded."""
    import dataclasses

    from train import checkpoint, release
    from train.model import ModelConfig, build_model
    from train.text_encoder import TextConfig, TextEncoder

    if release.is_release(ckpt):
        return release.load_release(ckpt, device=device)
    folder = checkpoint.resolve(ckpt)
    meta = with_sampling_defaults(checkpoint.load_meta(folder))
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    model_args = {k: tuple(v) if isinstance(v, list) else v for k, v in meta["model"].items() if k in fields}
    model = build_model(ModelConfig(**model_args))
    if ema is None:
        ema = checkpoint.has_ema(folder)
        if meta.get("ema") and not ema:  # recorded since EMA runs save it; older checkpoints cannot tell
            raise checkpoint.CheckpointError(f"{folder}: the run kept EMA weights but ema.safetensors is missing; "
                                             f"--no-ema samples the raw weights")
    model.load_state_dict(checkpoint.load_weights(folder, ema=ema), strict=True)
    encoder = TextEncoder.from_config(TextConfig(**meta["text"]))
    encoder.configure(CONVENTIONS[meta["convention"]].pad_token_id, PRECISION_DTYPES[meta["precision"]])
    return model.to(device).eval(), encoder.to(device), dict(meta, checkpoint=str(folder),
                                                             weights="ema" if ema else "raw")


def with_sampling_defaults(meta: dict) -> dict:
    """A checkpoint's meta with the sampling keys filled for checkpoints written before they were
    recorded: those runs all used this project's convention and sampled in fp32 with the square,
    uncropped micro-conditions."""
    return {"convention": "tessera", "precision": "fp32",
            "sample_micro_conds": square_micro_conds(meta["resolution"]), **meta}


DEFAULT_CFG = 9.0  # Meissonic's guidance scale: releases and runs that recorded none


def sample_to_file(ckpt: str | Path, prompts: list[str], out: str | Path, steps: int = 48, cfg: float | None = None,
                   seed: int = 0, n: int = 4, negative_prompt: str = "", vq_path: str | None = None,
                   decode: str = "vq", ema: bool | None = None, device: str | None = None) -> tuple[Path, dict]:
    """`train sample`: n images per prompt from a checkpoint, decoded and saved as one grid PNG.
    cfg None: the guidance scale the run's stage samples with (`sample.cfg`, recorded in the
    checkpoint: 3 for the tiny debug model, 9 for the Meissonic stages), else 9.
    Returns (the grid's path, what was used: checkpoint folder, weights, cfg)."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, encoder, meta = load_for_sampling(ckpt, ema=ema, device=device)
    cfg = float(meta.get("sample_cfg", DEFAULT_CFG)) if cfg is None else cfg
    vq = None
    if decode == "vq":  # load first: a missing VQ should fail before minutes of sampling
        from core.vq import load_vq

        vq = load_vq(vq_path or meta["vq"], device=device)
    batch = [p for p in prompts for _ in range(n)]
    with make_progress(transient=True) as progress:  # minutes on a CPU: show the decoding steps
        bar = progress.add_task(f"sampling {len(batch)} images", total=steps + (vq is not None))
        codes = generate(model, encoder, batch, tuple(meta["grid"]), meta["sample_micro_conds"], steps=steps, cfg=cfg,
                         negative_prompt=negative_prompt, seed=seed, convention=CONVENTIONS[meta["convention"]],
                         autocast=PRECISION_DTYPES[meta["precision"]], on_step=lambda: progress.advance(bar))
        images = decode_vq(vq, codes) if vq is not None else codes_to_colors(codes, model.cfg.codebook_size)
        progress.update(bar, completed=steps + (vq is not None))
    used = {"checkpoint": meta.get("checkpoint", str(ckpt)), "weights": meta.get("weights", "raw"), "cfg": cfg}
    return save_grid(images, out, nrow=n), used
