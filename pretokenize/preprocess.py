"""Image preprocessing exactly as Meissonic's / aMUSEd's trainers do it, as small pure functions.

    decode (core.image.decode_rgb: pixel cap, EXIF transpose, RGB, alpha composited on white)
    -> resize the shorter side to `res` (bilinear, antialiased: torchvision `Resize(res)` on a
       PIL image, which is PIL's bilinear filter with its support widened when downscaling)
    -> square `res` x `res` crop (center: torchvision `CenterCrop`; random: a seeded
       `RandomCrop.get_params`) -> uint8 (res, res, 3); the encoder takes /255 floats in [0, 1].

Micro-conditioning recorded per sample, following aMUSEd's `train_amused.py` (which Meissonic's
trainer copies) and the SDXL trainers: `orig_w, orig_h` = the image's size before any resize,
`crop_top, crop_left` = the crop's offset **in the resized image** (shorter side = res), which is
what those models were trained to read. See docs/pretokenize.md.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
from PIL import Image

from core.image import DEFAULT_MAX_PIXELS, decode_rgb

CROPS = ("center", "random")


@dataclass(frozen=True)
class Prepared:
    pixels: np.ndarray  # (res, res, 3) uint8
    orig_w: int  # width of the decoded (EXIF-transposed) image before resizing
    orig_h: int
    crop_top: int  # crop offset in the resized image (shorter side = res)
    crop_left: int


def resized_size(w: int, h: int, res: int) -> tuple[int, int]:
    """(new_w, new_h) with the shorter side = res; the longer side truncated as torchvision does."""
    if w <= h:
        return res, int(res * h / w)
    return int(res * w / h), res


def center_offset(size: int, crop: int) -> int:
    """torchvision CenterCrop: round((size - crop) / 2)."""
    return int(round((size - crop) / 2.0))


def crop_seed(base_seed: int, shard: str, key: str) -> int:
    """Per-sample random-crop seed: a stable hash of (base seed, shard stem, key), so a rerun,
    a resumed run or another machine draws the same crop for the same sample."""
    digest = hashlib.sha256(f"{base_seed}:{shard}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


def crop_offsets(new_w: int, new_h: int, res: int, mode: str, seed: int = 0) -> tuple[int, int]:
    """(top, left) of the res x res crop in a new_w x new_h image."""
    if mode == "center":
        return center_offset(new_h, res), center_offset(new_w, res)
    if mode == "random":
        rng = np.random.default_rng(seed)
        top = int(rng.integers(0, new_h - res + 1))
        left = int(rng.integers(0, new_w - res + 1))
        return top, left
    raise ValueError(f"crop must be one of {CROPS}, got {mode!r}")


def resize_and_crop(img: Image.Image, res: int, top: int | None, left: int | None,
                    mode: str = "center", seed: int = 0) -> Prepared:
    """Resize the shorter side to res and crop; `top/left` given = reuse a recorded crop."""
    w, h = img.size
    new_w, new_h = resized_size(w, h, res)
    resized = img.resize((new_w, new_h), Image.BILINEAR) if (new_w, new_h) != (w, h) else img
    if top is None or left is None:
        top, left = crop_offsets(new_w, new_h, res, mode, seed)
    pixels = np.asarray(resized.crop((left, top, left + res, top + res)), dtype=np.uint8)
    return Prepared(pixels, w, h, top, left)


def prepare(data: bytes, res: int, mode: str = "center", seed: int = 0,
            max_pixels: int = DEFAULT_MAX_PIXELS) -> Prepared:
    """Encoded image bytes -> the res x res uint8 crop and its micro-conditions. Decoded by the
    one safe decoder (core.image: pixel cap read from the header before decoding, EXIF
    orientation, 16-bit scaled, transparency over white)."""
    return resize_and_crop(decode_rgb(data, max_pixels), res, None, None, mode, seed)


def to_unit_tensor(batch: np.ndarray, device=None):
    """(B, res, res, 3) uint8 -> (B, 3, res, res) float32 in [0, 1] (ToTensor, no normalisation).
    With a `device`, the uint8 batch is moved first (4x fewer bytes over PCIe) and converted there.
    The result is contiguous NCHW: a bare permute leaves channels-last strides, which the
    encoder's convolutions inherit layer after layer (a different, untested cuDNN path from the
    one `bench/gpu_pretokenize.py` times for the encoder alone)."""
    import torch

    x = torch.from_numpy(batch).to(device).permute(0, 3, 1, 2)
    return x.to(torch.float32, memory_format=torch.contiguous_format).div_(255.0)  # one pass: cast + layout
