"""open_clip image and text embeddings from a local checkpoint; image-text cosine similarity.

The same loaded model serves the aesthetic predictor (its input is the image embedding)
and the `similarity` column, so a CLIP is loaded once per worker. For OpenAI's ViT-L/14
weights use arch "ViT-L-14" with quick_gelu=True (how OpenAI trained it).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from curate.scorers import ScorerError, require_file


@dataclass
class Clip:
    model: Any  # open_clip CLIP
    preprocess: Any  # PIL -> (3, H, W) tensor
    tokenizer: Any  # list[str] -> (B, context) token ids
    device: str

    @property
    def embed_dim(self) -> int:
        """Width of the image embedding (768 for ViT-L-14), what the aesthetic MLP takes."""
        return int(self.model.visual.output_dim)


def register_config(path: str | Path) -> str:
    """Register an open_clip model config JSON (an architecture open_clip does not ship);
    returns its name (the file's stem)."""
    import open_clip

    p = require_file(path, "open_clip model config")
    open_clip.add_model_config(p)
    return p.stem


def load_clip(path: str | Path, arch: str = "ViT-L-14", quick_gelu: bool = True, device: str = "cpu",
              config_path: str | Path | None = None) -> Clip:
    """An open_clip model of `arch` with the weights at `path` (state dict or safetensors)."""
    import open_clip

    p = require_file(path, "CLIP")
    if config_path:
        register_config(config_path)
    if arch not in open_clip.list_models():
        raise ScorerError(f"unknown open_clip architecture {arch!r} for {p} "
                          f"(e.g. ViT-L-14, ViT-B-32; or give its config JSON with --clip-config)")
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(
            arch, pretrained=str(p), force_quick_gelu=quick_gelu, device=device)
    except (RuntimeError, KeyError, ValueError) as exc:
        raise ScorerError(f"CLIP checkpoint {p} does not match open_clip architecture {arch!r}: "
                          f"{str(exc).splitlines()[0]}") from exc
    return Clip(model.eval(), preprocess, open_clip.get_tokenizer(arch), device)


@torch.no_grad()
def embed_images(clip: Clip, images: list[Image.Image]) -> torch.Tensor:
    """(B, D) L2-normalised image embeddings of B RGB images."""
    batch = torch.stack([clip.preprocess(im) for im in images]).to(clip.device)  # (B, 3, H, W)
    return torch.nn.functional.normalize(clip.model.encode_image(batch).float(), dim=-1).cpu()


@torch.no_grad()
def embed_texts(clip: Clip, texts: list[str]) -> torch.Tensor:
    """(B, D) L2-normalised text embeddings (captions are truncated to the context length)."""
    tokens = clip.tokenizer([t or "" for t in texts]).to(clip.device)  # (B, context)
    return torch.nn.functional.normalize(clip.model.encode_text(tokens).float(), dim=-1).cpu()


def cosine(image_emb: torch.Tensor, text_emb: torch.Tensor) -> torch.Tensor:
    """(B,) cosine similarity of row-aligned, already normalised embeddings."""
    return (image_emb * text_emb).sum(dim=-1)
