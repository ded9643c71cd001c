"""Image scorers that fill LAION's score columns, each loaded from a local checkpoint.

    aesthetic   LAION improved aesthetic predictor v2 on CLIP ViT-L/14 image embeddings
    watermark   LAION watermark detector (timm efficientnet_b3a + MLP head)  -> pwatermark
    clip_sim    open_clip image-text cosine similarity                       -> similarity
    nsfw        Yahoo Open-NSFW (ONNX, weights ship in its package)          -> punsafe

Each module has a `load_*(path, ...)` that fails with ScorerError naming the file when it
is missing or does not fit the architecture, and a batched scoring function.
"""
from __future__ import annotations

from pathlib import Path

from core.errors import UserError


class ScorerError(UserError):
    """A scorer checkpoint is missing or does not match its architecture (message names the file)."""


def require_file(path: str | Path, what: str) -> Path:
    """`path` as a Path, or ScorerError saying which checkpoint is missing."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise ScorerError(f"{what} checkpoint not found: {p} (pass the local file path; no model hub is used)")
    return p


def load_state_dict(path: Path, what: str) -> dict:
    """A checkpoint's tensors (plain state dict, or one under 'state_dict' / 'weights')."""
    import torch

    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle / zip errors: the message must name the file
        raise ScorerError(f"{what} checkpoint {path} could not be read: {type(exc).__name__}: {exc}") from exc
    for wrapper in ("state_dict", "weights"):
        if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
            obj = obj[wrapper]
    if not isinstance(obj, dict):
        raise ScorerError(f"{what} checkpoint {path} holds a {type(obj).__name__}, expected a state dict")
    # DataParallel / DeepSpeed prefixes.
    return {k.removeprefix("module."): v for k, v in obj.items()}
