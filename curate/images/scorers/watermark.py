"""LAION watermark detector (`watermark_model_v1.pt`).

timm `efficientnet_b3a` whose classifier is replaced by an MLP head
Linear(1536, 625) -> ReLU -> Dropout(0.3) -> Linear(625, 256) -> ReLU -> Linear(256, 2);
input 256x256 (a plain resize, no crop), ImageNet normalisation; class 0 is "watermark",
so pwatermark = softmax(logits)[:, 0]. The file is that model's full state dict.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import torch
from PIL import Image
from torch import nn

from curate.images.scorers import ScorerError, load_state_dict, require_file

DEFAULT_ARCH = "efficientnet_b3a"
INPUT_SIZE = 256
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def build_watermark_model(arch: str = DEFAULT_ARCH) -> nn.Module:
    """The detector's architecture with random weights (timm backbone + LAION's head)."""
    import timm

    try:
        with warnings.catch_warnings():
            # timm maps the name efficientnet_b3a to efficientnet_b3 (same modules and keys).
            warnings.filterwarnings("ignore", message="Mapping deprecated model name")
            model = timm.create_model(arch, pretrained=False, num_classes=2)
    except RuntimeError as exc:  # timm: "Unknown model (...)"
        raise ScorerError(f"watermark architecture {arch!r} is not a timm model: {exc}") from exc
    model.classifier = nn.Sequential(
        nn.Linear(model.num_features, 625),  # 1536 features for efficientnet_b3a
        nn.ReLU(),
        nn.Dropout(p=0.3),
        nn.Linear(625, 256),
        nn.ReLU(),
        nn.Linear(256, 2),
    )
    return model


def load_watermark(path: str | Path, arch: str = DEFAULT_ARCH, device: str = "cpu") -> nn.Module:
    """The detector from its state dict; a checkpoint of another architecture is refused."""
    p = require_file(path, "watermark")
    state = load_state_dict(p, "watermark")
    model = build_watermark_model(arch)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0:3]
        raise ScorerError(f"watermark checkpoint {p} does not match architecture {arch!r} with the LAION head "
                          f"(--watermark-arch picks another timm backbone): {' '.join(first)}") from exc
    return model.eval().to(device)


def preprocess(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> (3, 256, 256) normalised tensor, as the detector was trained."""
    from torchvision import transforms as T

    return T.Compose([
        T.Resize((INPUT_SIZE, INPUT_SIZE)),
        T.ToTensor(),
        T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])(image)


@torch.no_grad()
def watermark_scores(model: nn.Module, images: list[Image.Image]) -> torch.Tensor:
    """(B,) probability of a watermark for B RGB images."""
    if not images:
        return torch.zeros(0)
    device = next(model.parameters()).device
    batch = torch.stack([preprocess(im) for im in images]).to(device)  # (B, 3, 256, 256)
    return torch.softmax(model(batch).float(), dim=1)[:, 0].cpu()
