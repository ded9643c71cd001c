"""Tiny models of the scorers' real architectures, saved to disk as the real checkpoints are."""
from __future__ import annotations

import json
from pathlib import Path

import torch

TINY_CLIP_NAME = "tessera-tiny-clip"
TINY_CLIP = {"embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "patch_size": 16},
             "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1}}
SMALL_WATERMARK_ARCH = "test_efficientnet"  # timm's tiny efficientnet: same head, fast on CPU


def tiny_clip_files(folder: Path, name: str = TINY_CLIP_NAME, cfg: dict = TINY_CLIP) -> tuple[Path, Path]:
    """(config json, checkpoint) of a random tiny open_clip model (state dict, as open_clip saves)."""
    import open_clip

    cfg_path = folder / f"{name}.json"
    cfg_path.write_text(json.dumps(cfg))
    open_clip.add_model_config(cfg_path)
    torch.manual_seed(0)
    ckpt = folder / f"{name}.pt"
    torch.save(open_clip.create_model(name).state_dict(), ckpt)
    return cfg_path, ckpt


def tiny_aesthetic_file(folder: Path, dim: int = 32) -> Path:
    from curate.images.scorers.aesthetic import AestheticMLP

    torch.manual_seed(1)
    path = folder / "sac+logos+ava1-l14-linearMSE.pth"
    torch.save(AestheticMLP(dim).state_dict(), path)
    return path


def small_watermark_file(folder: Path, arch: str = SMALL_WATERMARK_ARCH) -> Path:
    from curate.images.scorers.watermark import build_watermark_model

    torch.manual_seed(2)
    path = folder / "watermark_model_v1.pt"
    torch.save(build_watermark_model(arch).state_dict(), path)
    return path


def all_models(folder: Path) -> dict[str, str]:
    """ScoreConfig fields for every scorer, with tiny models written under `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    cfg_path, clip = tiny_clip_files(folder)
    return {"clip_model": str(clip), "clip_arch": TINY_CLIP_NAME, "clip_config": str(cfg_path),
            "clip_quick_gelu": False, "aesthetic_model": str(tiny_aesthetic_file(folder)),
            "watermark_model": str(small_watermark_file(folder)), "watermark_arch": SMALL_WATERMARK_ARCH,
            "nsfw": True}
