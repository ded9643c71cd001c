"""Exponential moving average of the model's weights (fp32 shadow copy)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class EMAConfig:
    enabled: bool = False  # keep an EMA copy of the weights (saved beside the weights)
    decay: float = 0.9999  # per-update decay at convergence
    warmup: bool = True  # use min(decay, (1 + n) / (10 + n)) so early averages are not stale
    every: int = 1  # update every N optimizer steps

    def __post_init__(self) -> None:
        if not 0 < self.decay < 1:
            raise ValueError(f"ema.decay must lie in (0, 1), got {self.decay}")
        if self.every < 1:
            raise ValueError(f"ema.every must be >= 1, got {self.every}")


def ema_decay(updates: int, cfg: EMAConfig) -> float:
    """Decay used for update number `updates` (0-based)."""
    if not cfg.warmup:
        return cfg.decay
    return min(cfg.decay, (1 + updates) / (10 + updates))


class EMA:
    """Shadow fp32 copy of every floating parameter; `update(model)` after each optimizer step."""

    def __init__(self, model: nn.Module, cfg: EMAConfig):
        self.cfg = cfg
        self.updates = 0
        self.shadow = {
            n: p.detach().float().clone() for n, p in model.named_parameters() if p.dtype.is_floating_point
        }

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        if step % self.cfg.every:
            return
        d = ema_decay(self.updates, self.cfg)
        params = dict(model.named_parameters())
        names = list(self.shadow)
        # One fused multi-tensor kernel instead of a launch per tensor (867 of them in the 1B model).
        torch._foreach_lerp_([self.shadow[n] for n in names], [params[n].detach().float() for n in names], 1 - d)
        self.updates += 1

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The EMA weights (saved as safetensors); `updates` goes in the state file."""
        return {n: t.contiguous() for n, t in self.shadow.items()}

    def load_state_dict(self, weights: dict[str, torch.Tensor], updates: int) -> None:
        missing = set(self.shadow) - set(weights)
        if missing:
            raise KeyError(f"EMA weights lack {len(missing)} tensors, e.g. {sorted(missing)[:3]}")
        for name, t in self.shadow.items():
            t.copy_(weights[name])
        self.updates = updates

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Overwrite the model's parameters with the EMA weights (for sampling/export)."""
        for name, param in model.named_parameters():
            if name in self.shadow:
                param.copy_(self.shadow[name].to(param.dtype))
