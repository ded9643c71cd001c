"""LAION improved aesthetic predictor v2 (`sac+logos+ava1-l14-linearMSE.pth`).

An MLP without activations, 768 -> 1024 -> 128 -> 64 -> 16 -> 1, applied to the
L2-normalised CLIP ViT-L/14 (OpenAI) image embedding; outputs a 1-10 style score. The module
names match the released state dict (`layers.0`, `layers.2`, `layers.4`, `layers.6`,
`layers.7`; the odd indices 1, 3, 5 are Dropout), so the file loads as it is.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from curate.images.scorers import ScorerError, load_state_dict, require_file

HIDDEN = (1024, 128, 64, 16)
EXPECTED_KEYS = tuple(f"layers.{i}.{p}" for i in (0, 2, 4, 6, 7) for p in ("weight", "bias"))


class AestheticMLP(nn.Module):
    """The predictor as upstream defines it (its ReLUs are commented out there too)."""

    def __init__(self, input_size: int = 768) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(input_size, 1024),
            nn.Dropout(0.2),
            nn.Linear(1024, 128),
            nn.Dropout(0.2),
            nn.Linear(128, 64),
            nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        return self.layers(emb)  # (B, D) -> (B, 1)


def load_aesthetic(path: str | Path, device: str = "cpu") -> AestheticMLP:
    """The predictor from its checkpoint; the input width is read from `layers.0.weight`."""
    p = require_file(path, "aesthetic")
    state = load_state_dict(p, "aesthetic")
    missing = [k for k in EXPECTED_KEYS if k not in state]
    if missing:
        raise ScorerError(f"aesthetic checkpoint {p} does not match the LAION aesthetic MLP: "
                          f"missing {missing[:3]} (expected keys {', '.join(EXPECTED_KEYS[::2])})")
    model = AestheticMLP(int(state["layers.0.weight"].shape[1]))
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ScorerError(f"aesthetic checkpoint {p} does not match the LAION aesthetic MLP: {exc}") from exc
    return model.eval().to(device)


def input_size(model: AestheticMLP) -> int:
    return int(model.layers[0].in_features)


@torch.no_grad()
def aesthetic_scores(model: AestheticMLP, image_emb: torch.Tensor) -> torch.Tensor:
    """(B, D) CLIP image embeddings -> (B,) scores; the embeddings are L2-normalised here."""
    emb = nn.functional.normalize(image_emb.float(), dim=-1)
    return model(emb.to(next(model.parameters()).device)).squeeze(-1).cpu()
