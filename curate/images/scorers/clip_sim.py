"""open_clip image and text embeddings from a local checkpoint; image-text cosine similarity.

The same loaded model serves the aesthetic predictor (its input is the image embedding)
and the `similarity` column, so a CLIP is loaded once per worker. For OpenAI's ViT-L/14
weights use arch "ViT-L-14" with quick_gelu=True (how OpenAI trained it).
"""
from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from curate.images.scorers import ScorerError, require_file


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


def is_torchscript(path: Path) -> bool:
    """True for a TorchScript archive such as OpenAI's own `ViT-L-14.pt` (zip with code/ and
    constants.pkl); a torch.save state dict is a zip without them."""
    try:
        with zipfile.ZipFile(path) as zf:
            return any(n.endswith("/constants.pkl") for n in zf.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def load_openai_archive(path: Path, arch: str, device: str) -> Clip:
    """OpenAI's TorchScript release (what `clip.load("ViT-L/14")` downloads): the architecture
    is read from the weights' shapes, with QuickGELU and OpenAI's normalisation."""
    import open_clip
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

    from open_clip.model import build_model_from_openai_state_dict

    try:
        archive = torch.jit.load(str(path), map_location="cpu")
        # Keep the weights only (a re-scripted open_clip model also carries its attn_mask buffer).
        state = {k: v for k, v in archive.state_dict().items() if k != "attn_mask"}
        model = build_model_from_openai_state_dict(state).to(device).float()  # OpenAI ships fp16 weights
    except (RuntimeError, KeyError, ValueError) as exc:
        raise ScorerError(f"CLIP checkpoint {path} is a TorchScript archive but not an OpenAI CLIP: "
                          f"{str(exc).splitlines()[0]}") from exc
    preprocess = open_clip.image_transform(model.visual.image_size, is_train=False,
                                           mean=OPENAI_DATASET_MEAN, std=OPENAI_DATASET_STD)
    return Clip(model.eval(), preprocess, open_clip.get_tokenizer(arch), device)


def load_clip(path: str | Path, arch: str = "ViT-L-14", quick_gelu: bool = True, device: str = "cpu",
              config_path: str | Path | None = None) -> Clip:
    """An open_clip model of `arch` with the weights at `path`: an open_clip state dict,
    .safetensors, or OpenAI's TorchScript archive (then `arch` only picks the tokenizer)."""
    import open_clip

    p = require_file(path, "CLIP")
    if config_path:
        register_config(config_path)
    if is_torchscript(p):
        return load_openai_archive(p, arch, device)
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
