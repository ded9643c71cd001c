"""Which attention kernel runs: the dispatcher's choice for the model's shapes, and the attention
ops a profiled call really executed (compiled code calls the same aten ops, so both views agree).

On a GPU the wanted answer is FLASH_ATTENTION in bf16 (PyTorch's FlashAttention-2); EFFICIENT_ATTENTION
(xformers' kernel), CUDNN_ATTENTION or MATH mean a slower or different path (fp32 inputs, an
unsupported head size, a mask, or a backend switched off).
"""
from __future__ import annotations

from typing import Callable

import torch
from torch.nn.attention import SDPBackend

from train.model import ModelConfig


def sdpa_choice(cfg: ModelConfig, grid: tuple[int, int], batch: int, device: torch.device,
                dtype: torch.dtype, text_len: int = 77) -> str:
    """The SDPA backend the dispatcher picks for the joint attention of ``batch`` samples of an
    (h, w) code grid: q, k, v (B, H, L + T, Dh) laid out as the model makes them (a transposed
    view of (B, S, H, Dh)). Returns the SDPBackend name, e.g. "FLASH_ATTENTION"."""
    gh, gw = cfg.token_grid(*grid)
    q = torch.zeros(batch, gh * gw + text_len, cfg.heads, cfg.head_dim, device=device, dtype=dtype).transpose(1, 2)
    return SDPBackend(torch._fused_sdp_choice(q, q, q)).name


def attention_ops(fn: Callable[[], object], device: torch.device) -> list[str]:
    """Names of the attention ops (``aten::_scaled_dot_product_*``) that ``fn()`` ran, from the
    profiler: e.g. ``aten::_scaled_dot_product_flash_attention`` and its ``_backward``."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    return sorted({e.key for e in prof.key_averages() if e.key.startswith("aten::_scaled_dot_product")})
