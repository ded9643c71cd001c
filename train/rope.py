"""Rotary position embedding over (axis0, row, col) ids, as Flux and Meissonic use it.

Every token carries three integer ids. Text tokens are all (0, 0, 0); an image token at
row i, column j of the *transformer's* token grid (after the optional 2x2 compression) is
(0, i, j). The head dimension is split into ``axes`` chunks (Meissonic: 16 + 56 + 56 = 128),
each rotated by its own id with the classic 1/theta^(2k/d) frequencies.
"""
from __future__ import annotations

import torch


def rope_ids(h: int, w: int, text_len: int, device: torch.device | str | None = None
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Position ids of an (h, w) token grid and of ``text_len`` text tokens.

    This is the ONE place positions are derived: pass the grid the transformer blocks see
    (the code grid halved in each direction when the model compresses 2x2).
    Returns img_ids (h*w, 3) row-major and txt_ids (text_len, 3), float32.
    """
    if h <= 0 or w <= 0 or text_len < 0:
        raise ValueError(f"rope_ids needs a positive grid and text_len >= 0, got {h}x{w}, {text_len}")
    rows = torch.arange(h, device=device, dtype=torch.float32)
    cols = torch.arange(w, device=device, dtype=torch.float32)
    img_ids = torch.zeros(h, w, 3, device=device)
    img_ids[..., 1] = rows[:, None]
    img_ids[..., 2] = cols[None, :]
    txt_ids = torch.zeros(text_len, 3, device=device)
    return img_ids.reshape(h * w, 3), txt_ids


def axis_frequencies(dim: int, theta: float, device: torch.device | str | None = None) -> torch.Tensor:
    """The dim/2 rotation frequencies 1/theta^(2k/dim) of one axis, float64 where the device allows."""
    dtype = torch.float32 if torch.device(device or "cpu").type == "mps" else torch.float64
    return 1.0 / theta ** (torch.arange(0, dim, 2, device=device, dtype=dtype) / dim)


def rope_cos_sin(ids: torch.Tensor, axes: tuple[int, ...], theta: float = 10000.0
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables (S, sum(axes)) float32 for ids (S, len(axes)).

    Each angle is repeated twice (interleaved) because pairs (x[2k], x[2k+1]) are rotated together.
    """
    if ids.shape[-1] != len(axes):
        raise ValueError(f"ids have {ids.shape[-1]} axes but rope_axes has {len(axes)}")
    cos, sin = [], []
    for axis, dim in enumerate(axes):
        freqs = axis_frequencies(dim, theta, ids.device)
        angles = torch.outer(ids[:, axis].to(freqs.dtype), freqs)  # (S, dim/2)
        cos.append(angles.cos().repeat_interleave(2, dim=1).float())
        sin.append(angles.sin().repeat_interleave(2, dim=1).float())
    return torch.cat(cos, dim=1), torch.cat(sin, dim=1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, H, S, D) by the tables (S, D): pairs (a, b) -> (a cos - b sin, b cos + a sin).

    Computed in float32 and cast back, so bf16 activations do not lose the rotation's precision.
    """
    pairs = x.float().reshape(*x.shape[:-1], -1, 2)
    real, imag = pairs.unbind(-1)
    rotated = torch.stack((-imag, real), dim=-1).flatten(-2)  # (B, H, S, D)
    return (x.float() * cos + rotated * sin).to(x.dtype)
