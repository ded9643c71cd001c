"""FLOPs of the Meissonic transformer and GPU-days plans.

Counts are exact for the matrix products (linears, 1x1 and 2x2 convolutions, attention's QK^T and
AV), one multiply-add = 2 FLOPs, and leave out the elementwise work (norms, RoPE, activations),
like the usual 6N rule. Training FLOPs = 3 x forward (backward costs two forwards); activation
checkpointing's extra forward is not counted, so MFU means *model* FLOPs utilisation.

Sequence lengths matter here: every image token attends over T text tokens + L image tokens and
the text stream has its own weights in the dual blocks, so FLOPs per image token exceed 6N at
256 px (L = 256, T = 77) and grow with resolution through the attention term.
"""
from __future__ import annotations

import dataclasses

from train.model import ModelConfig

# Peak dense bf16 tensor-core throughput (TFLOP/s, SXM parts, no sparsity).
GPU_PEAK_TFLOPS: dict[str, float] = {"h100": 989.0, "h200": 989.0, "a100": 312.0}
PAPER_H100_DAYS = 48.0  # Meissonic paper: the whole three-stage training on H100s
GOAL_H100_DAYS = 12.0  # this project's goal for the three stages (issue 12)
# The paper's three stages as (name, code grid, global batch, steps, compression): reference only,
# to put a plan beside the paper's figure; the trainer's own settings live in pipelines.yaml.
PAPER_STAGES: tuple[tuple[str, tuple[int, int], int, int, bool], ...] = (
    ("stage1", (16, 16), 2048, 100_000, False),
    ("stage2", (32, 32), 512, 100_000, False),
    ("stage3", (64, 64), 256, 42_000, True),
)


def param_count(cfg: ModelConfig) -> int:
    """Parameters of ``build_model(cfg)``, from the config alone."""
    d, f, hd = cfg.hidden, cfg.mlp_hidden, cfg.head_dim
    linear = lambda i, o, bias=True: i * o + (o if bias else 0)  # noqa: E731
    dual = (2 * linear(d, 6 * d) + 8 * linear(d, d) + 4 * hd
            + 2 * (linear(d, f) + linear(f, d)))
    single = linear(d, 3 * d) + linear(d, f) + linear(d + f, d) + 3 * linear(d, d) + 2 * hd
    cond_in = cfg.pooled_dim + cfg.micro_cond_dim * cfg.micro_cond_embed_dim
    stem = (cfg.vocab_size * d + d + d * d                                # embed
            + linear(cond_in, d, False) + linear(d, d, False)             # cond_embed
            + linear(cfg.timestep_embed_dim, d) + 3 * linear(d, d)        # time_text_embed
            + linear(cfg.text_dim, d) + d                                 # context_embedder + norm
            + 2 * (d + d * d)                                             # project_to/from_hidden
            + d * d + d + d * cfg.codebook_size)                          # mlm_layer
    compression = 2 * (d + 4 * d * d) if cfg.downsample else 0
    return stem + cfg.dual_blocks * dual + cfg.single_blocks * single + compression


def forward_flops(cfg: ModelConfig, grid: tuple[int, int], text_len: int = 77) -> float:
    """Forward FLOPs of ONE sample with an (h, w) code grid and ``text_len`` text tokens."""
    d, f, k = cfg.hidden, cfg.mlp_hidden, cfg.codebook_size
    n = grid[0] * grid[1]                      # code tokens
    gh, gw = cfg.token_grid(*grid)
    length, t = gh * gw, text_len              # image tokens in the blocks, text tokens
    s = length + t                             # joint sequence
    attention = 4.0 * s * s * d                # QK^T and AV over all heads
    dual_token = 2.0 * (4 * d * d + 2 * d * f)            # q, k, v, out + MLP, per token per stream
    single_token = 2.0 * (3 * d * d + d * f + (d + f) * d)
    per_sample = 2.0 * ((cfg.pooled_dim + cfg.micro_cond_dim * cfg.micro_cond_embed_dim) * d + d * d
                        + cfg.timestep_embed_dim * d + 3 * d * d
                        + cfg.dual_blocks * 12 * d * d + cfg.single_blocks * 3 * d * d)  # AdaLN
    return (n * 2.0 * (2 * d * d + d * k)                          # embed conv + mlm convs
            + (length * 2.0 * 8 * d * d if cfg.downsample else 0)  # 2x2 down + up
            + length * 2.0 * 2 * d * d + t * 2.0 * cfg.text_dim * d
            + cfg.dual_blocks * (s * dual_token + attention)
            + cfg.single_blocks * (s * single_token + attention)
            + per_sample)


def flops_per_token(cfg: ModelConfig, grid: tuple[int, int], text_len: int = 77) -> float:
    """Training FLOPs (forward + backward = 3 forwards) per image code token (before any 2x2 compression)."""
    return 3.0 * forward_flops(cfg, grid, text_len) / (grid[0] * grid[1])


def gpu_days(total_flops: float, gpu: str, mfu: float) -> float:
    """GPU-days to execute ``total_flops`` on ``gpu`` at model-FLOPs utilisation ``mfu``."""
    if gpu not in GPU_PEAK_TFLOPS:
        raise ValueError(f"unknown gpu {gpu!r}; choose one of {sorted(GPU_PEAK_TFLOPS)}")
    if not 0 < mfu <= 1:
        raise ValueError(f"mfu must be in (0, 1], got {mfu}")
    return total_flops / (GPU_PEAK_TFLOPS[gpu] * 1e12 * mfu) / 86400.0


def plan(cfg: ModelConfig, grid: tuple[int, int], steps: int, batch_size: int, gpus: int,
         gpu: str = "h100", mfu: float = 0.4, text_len: int = 77) -> dict[str, float | str | int]:
    """GPU-days and wall-clock days of a stage, with the paper's 48 H100-days beside it.

    ``batch_size`` is the global batch (images per optimizer step); ``mfu`` a measured
    (bench/gpu_train.py) or assumed model-FLOPs utilisation.
    """
    if steps <= 0 or batch_size <= 0 or gpus <= 0:
        raise ValueError(f"steps, batch_size and gpus must be > 0, got {steps}, {batch_size}, {gpus}")
    per_token = flops_per_token(cfg, grid, text_len)
    total = per_token * grid[0] * grid[1] * batch_size * steps
    days = gpu_days(total, gpu, mfu)
    return {"gpu": gpu, "gpus": gpus, "mfu": mfu, "grid": f"{grid[0]}x{grid[1]}", "steps": steps,
            "batch_size": batch_size, "params": param_count(cfg), "flops_per_token": per_token,
            "total_flops": total, "gpu_days": days, "wall_days": days / gpus,
            "images_per_s": batch_size * steps / (days / gpus * 86400.0),
            "h100_days_at_same_mfu": gpu_days(total, "h100", mfu),
            "paper_h100_days_all_stages": PAPER_H100_DAYS}


def measured_plan(cfg: ModelConfig, grid: tuple[int, int], steps: int, batch_size: int, step_s: float,
                  images_per_step: int, gpu: str, gpus: int = 1, text_len: int = 77) -> dict[str, float | str | int]:
    """GPU-days of a stage from a measured step: ``step_s`` seconds per optimizer step of
    ``images_per_step`` images on ONE GPU of kind ``gpu`` (``train plan --measured``). The stage
    trains ``steps * batch_size`` images; ``gpus`` only divides the wall-clock time (linear
    scaling assumed: one GPU's step time with the all-reduce left out)."""
    if step_s <= 0 or images_per_step <= 0 or gpus <= 0:
        raise ValueError(f"step_s, images_per_step and gpus must be > 0, got {step_s}, {images_per_step}, {gpus}")
    if gpu not in GPU_PEAK_TFLOPS:
        raise ValueError(f"unknown gpu {gpu!r}; choose one of {sorted(GPU_PEAK_TFLOPS)}")
    images_per_s = images_per_step / step_s
    images = steps * batch_size
    days = images / images_per_s / 86400.0
    achieved = flops_per_token(cfg, grid, text_len) * grid[0] * grid[1] * images_per_s
    return {"gpu": gpu, "gpus": gpus, "grid": f"{grid[0]}x{grid[1]}", "steps": steps, "batch_size": batch_size,
            "images": images, "images_per_s_per_gpu": images_per_s, "mfu": achieved / (GPU_PEAK_TFLOPS[gpu] * 1e12),
            "gpu_days": days, "wall_days": days / gpus}


def paper_total_flops(cfg: ModelConfig, text_len: int = 77) -> float:
    """Training FLOPs of the paper's three stages for this model shape (compression from each stage)."""
    total = 0.0
    for _, grid, batch, steps, downsample in PAPER_STAGES:
        stage_cfg = dataclasses.replace(cfg, downsample=downsample)
        total += flops_per_token(stage_cfg, grid, text_len) * grid[0] * grid[1] * batch * steps
    return total


def paper_implied_mfu(cfg: ModelConfig, text_len: int = 77) -> float:
    """The MFU at which the paper's three stages take its 48 H100-days."""
    return paper_total_flops(cfg, text_len) / (PAPER_H100_DAYS * 86400.0 * GPU_PEAK_TFLOPS["h100"] * 1e12)
