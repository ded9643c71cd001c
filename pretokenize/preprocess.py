"""Image preprocessing exactly as Meissonic's / aMUSEd's trainers do it, as small pure functions.

    decode (core.image.decode_rgb: pixel cap, EXIF transpose, RGB, alpha composited on white)
    -> resize to the frame the ORIGINAL image has at shorter side = `res` (bilinear,
       antialiased: torchvision `Resize(res)` on a PIL image, which is PIL's bilinear filter
       with its support widened when downscaling); the download's own resize is undone by
       `pretokenize.geometry` (a center-cropped or padded download is handled there)
    -> square `res` x `res` crop (center: torchvision `CenterCrop`; random: a seeded
       `RandomCrop.get_params`) -> uint8 (res, res, 3); the encoder takes /255 floats in [0, 1].

Micro-conditioning recorded per sample, following aMUSEd's `train_amused.py` (which Meissonic's
trainer copies) and the SDXL trainers: `orig_w, orig_h` = the ORIGINAL image's size (before the
download resized it: img2dataset's original_width/height), `crop_top, crop_left` = the crop's
offset **in the original resized to shorter side = res**, which is what those models were
trained to read. An image with fewer pixels than the crop needs is `TooSmall` (no upscaling
unless allowed). See docs/pretokenize.md.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
from PIL import Image

from core.image import DEFAULT_MAX_PIXELS, decode_rgb
from pretokenize import geometry

CROPS = ("center", "random")


@dataclass(frozen=True)
class Prepared:
    pixels: np.ndarray  # (res, res, 3) uint8
    orig_w: int  # the original image's width (before the download resized it)
    orig_h: int
    crop_top: int  # crop offset in the original resized to shorter side = res
    crop_left: int
    note: tuple[str, str] | None = None  # (ledger reason, value): the recorded original size was corrected


def crop_seed(base_seed: int, shard: str, key: str) -> int:
    """Per-sample random-crop seed: a stable hash of (base seed, shard stem, key), so a rerun,
    a resumed run or another machine draws the same crop for the same sample."""
    digest = hashlib.sha256(f"{base_seed}:{shard}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


def cut(img: Image.Image, plan: geometry.Plan, res: int) -> Prepared:
    """The pixels of a crop plan: the content region, resized to the frame, cropped res x res."""
    left, top, w, h = plan.content
    if (left, top, w, h) != (0, 0, *img.size):
        img = img.crop((left, top, left + w, top + h))
    if img.size != plan.frame:
        img = img.resize(plan.frame, Image.BILINEAR)
    t, lft = plan.crop
    pixels = np.asarray(img.crop((lft, t, lft + res, t + res)), dtype=np.uint8)
    return Prepared(pixels, *plan.orig, *plan.micro_crop, plan.note)


def prepare(data: bytes, res: int, mode: str = "center", seed: int = 0, max_pixels: int = DEFAULT_MAX_PIXELS,
            orig: tuple[int, int] | None = None, source: str = "auto", allow_upscale: bool = False) -> Prepared:
    """Encoded image bytes -> the res x res uint8 crop and its micro-conditions. `orig` is the
    original size (img2dataset's original_width/height), `source` how the download resized it
    (geometry.SOURCES). Decoded by the one safe decoder (core.image: pixel cap read from the
    header before decoding, EXIF orientation, 16-bit scaled, transparency over white).
    Raises geometry.TooSmall when the crop would need upscaling and it is not allowed."""
    img = decode_rgb(data, max_pixels)
    return cut(img, geometry.plan(img.size, orig, res, source, mode, seed, allow_upscale), res)


def reproduce(data: bytes, res: int, orig: tuple[int, int] | None, source: str, top: int, left: int) -> np.ndarray:
    """The pixels of a recorded crop (for `pretokenize check`): recorded offsets are in the
    original's res frame, where a rescaled download is cropped too."""
    img = decode_rgb(data)
    plan = geometry.plan(img.size, orig, res, source, allow_upscale=True)
    if plan.crop != (0, 0) or plan.frame != (res, res):  # not a center-cropped download: reuse the offsets
        plan = geometry.Plan(plan.content, plan.frame, (top, left), plan.orig, (top, left))
    return cut(img, plan, res).pixels


def to_unit_tensor(batch: np.ndarray, device=None):
    """(B, res, res, 3) uint8 -> (B, 3, res, res) float32 in [0, 1] (ToTensor, no normalisation).
    With a `device`, the uint8 batch is moved first (4x fewer bytes over PCIe) and converted there.
    The result is contiguous NCHW: a bare permute leaves channels-last strides, which the
    encoder's convolutions inherit layer after layer (a different, untested cuDNN path from the
    one `bench/gpu_pretokenize.py` times for the encoder alone)."""
    import torch

    x = torch.from_numpy(batch).to(device).permute(0, 3, 1, 2)
    return x.to(torch.float32, memory_format=torch.contiguous_format).div_(255.0)  # one pass: cast + layout
