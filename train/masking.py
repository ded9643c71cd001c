"""The maths of masked-token training, as small pure functions (each tested on its own).

Training step:  t ~ U(0,1) -> mask ratio r = cos(pi t / 2) -> mask round(r * L) tokens (>= 1)
-> model(masked codes, timestep = cond_value(ratio actually masked)) -> CE on masked tokens.
The sampler calls the same `cond_value` with the fraction of tokens still masked, so the
model sees one conditioning convention in training and sampling. Upstream Meissonic does not:
its trainer feeds 1000 x the drawn ratio (the transformer's x1000 makes that r * 10^6) and its
pipeline feeds the step index counting down; `train/convention.py` reproduces that for the
released weights and records which convention a run uses.

Classifier-free guidance dropout lives here too: per sample with probability p, BOTH the
text hidden states and the pooled vector are replaced by the empty prompt's encoding
(upstream computes this mask inverted and then overwrites it).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

def mask_rate(t: torch.Tensor | float) -> torch.Tensor | float:
    """Cosine schedule: the fraction of tokens masked at time t in [0, 1] (1 at t=0, 0 at t=1)."""
    if isinstance(t, torch.Tensor):
        return torch.cos(math.pi * t / 2)
    return math.cos(math.pi * t / 2)


def cond_value(mask_ratio: torch.Tensor) -> torch.Tensor:
    """THE map from the fraction of masked tokens (B,) in [0, 1] to the model's `timestep` (B,).

    Used by training (`mask_tokens`' actual ratio) and by the sampler (ratio still masked) of
    runs trained here (convention "tessera"). The value is the ratio itself; the model's
    conditioning embedding multiplies it by 1000, so its sinusoid sees [0, 1000]. The released
    weights were trained on other values (1000 x ratio before that x1000, see train/convention.py)."""
    return mask_ratio.float()


def num_masked(ratio: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """How many of `num_tokens` tokens to mask for each ratio (B,): round(r*L) clamped to [1, L]."""
    return torch.round(ratio * num_tokens).long().clamp(1, num_tokens)


def mask_tokens(
    codes: torch.Tensor, t: torch.Tensor, mask_id: int, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask `num_masked(mask_rate(t))` random positions of each grid.

    codes (B, h, w) long, t (B,) in [0, 1] -> (masked codes (B, h, w), mask (B, h, w) bool).
    Positions are chosen uniformly without replacement (the k smallest of B x L uniforms)."""
    b = codes.shape[0]
    flat = codes.reshape(b, -1)
    k = num_masked(mask_rate(t), flat.shape[1]).to(codes.device)  # (B,)
    # Noise is drawn on the generator's device (the training device: no host-device copy,
    # so no synchronisation inside the step).
    scores = torch.rand(flat.shape, generator=generator, device=_device(generator, codes.device))
    ranks = scores.to(codes.device).argsort(dim=1).argsort(dim=1)  # (B, L) rank of each position
    mask = ranks < k[:, None]
    masked = torch.where(mask, torch.full_like(flat, mask_id), flat)
    return masked.view_as(codes), mask.view_as(codes)


def mask_ratio(mask: torch.Tensor) -> torch.Tensor:
    """Fraction of masked positions per sample: mask (B, ...) bool -> (B,) float."""
    return mask.reshape(mask.shape[0], -1).float().mean(dim=1)


def masked_ce(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over masked positions only.

    logits (B, L, V) (any float dtype; computed in fp32), targets (B, h, w) or (B, L) long,
    mask same shape as targets -> scalar. Every sample has >= 1 masked token by construction."""
    flat_mask = mask.reshape(-1)
    picked = logits.reshape(-1, logits.shape[-1])[flat_mask].float()  # (M, V)
    return F.cross_entropy(picked, targets.reshape(-1)[flat_mask])


def _device(generator: torch.Generator | None, default: torch.device | str = "cpu") -> torch.device:
    return generator.device if generator is not None else torch.device(default)


def sample_t(batch: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """t ~ U(0, 1) per sample -> (B,), on the generator's device."""
    return torch.rand(batch, generator=generator, device=_device(generator))


def cfg_drop_mask(batch: int, p: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Which samples lose their caption: (B,) bool, each True with probability p."""
    return torch.rand(batch, generator=generator, device=_device(generator)) < p


def apply_cfg_dropout(
    hidden: torch.Tensor,
    pooled: torch.Tensor,
    empty_hidden: torch.Tensor,
    empty_pooled: torch.Tensor,
    drop: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Replace BOTH hidden (B, T, D) and pooled (B, P) of the samples where drop (B,) is True
    with the empty prompt's encoding (1, T, D) / (1, P); the others are left untouched."""
    drop = drop.to(hidden.device)
    hidden = torch.where(drop[:, None, None], empty_hidden.to(hidden.dtype).expand_as(hidden), hidden)
    pooled = torch.where(drop[:, None], empty_pooled.to(pooled.dtype).expand_as(pooled), pooled)
    return hidden, pooled
