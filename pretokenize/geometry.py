"""Where a training crop sits in the ORIGINAL image, whatever `curate download` did to it.

Meissonic (as aMUSEd and SDXL) conditions on `orig_w, orig_h` (the image's size before any
resize) and `crop_top, crop_left`: the offset of the res x res crop in the original image
resized to shorter side = res (upstream's `process_image`: Resize(res) then a crop). The pixels
pretokenize reads were already resized by the download, in one of img2dataset's modes:

    rescale      keep_ratio / keep_ratio_largest / no, or any image left at its own size: the
                 stored image is the original, scaled. It is resized straight to the frame the
                 original would have at shorter side = res, and the crop is drawn there;
    center_crop  the original scaled to shorter side S, then center-cropped to S x S: the one
                 possible crop is that square; its offset in the res frame is img2dataset's
                 crop offset scaled by res / S;
    border       the original scaled to longer side S, then padded to S x S: the padding is cut
                 off and the content treated as a rescale.

All pure functions of sizes (pixels are handled by `preprocess`). A crop that would need more
pixels than the original or the stored image has (shorter side < res) is `TooSmall`: the
caller records it (`filtered`, `too_small`) unless upscaling is allowed.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SOURCES = ("auto", "rescale", "center_crop", "border")
# curate download's resize_mode -> how its output relates to the original
DOWNLOAD_MODES = {"keep_ratio": "rescale", "keep_ratio_largest": "rescale", "no": "rescale",
                  "center_crop": "center_crop", "border": "border"}


class TooSmall(ValueError):
    """The image has fewer pixels than the crop needs; the message is the ledger value."""


@dataclass(frozen=True)
class Plan:
    """How to cut one training image out of a stored one."""

    content: tuple[int, int, int, int]  # (left, top, width, height) of the stored image to use
    frame: tuple[int, int]  # (w, h) the content is resized to: shorter side = res
    crop: tuple[int, int]  # (top, left) of the res x res crop in `frame`
    orig: tuple[int, int]  # (w, h) of the original image
    micro_crop: tuple[int, int]  # (top, left) recorded: in the original's res frame
    note: tuple[str, str] | None = None  # (ledger reason, value) when the recorded original size was not used as given


def resized_size(w: int, h: int, res: int) -> tuple[int, int]:
    """(new_w, new_h) with the shorter side = res; the longer side truncated as torchvision does."""
    if w <= h:
        return res, int(res * h / w)
    return int(res * w / h), res


def center_offset(size: int, crop: int) -> int:
    """torchvision CenterCrop: round((size - crop) / 2)."""
    return int(round((size - crop) / 2.0))


def crop_offsets(new_w: int, new_h: int, res: int, mode: str, seed: int = 0) -> tuple[int, int]:
    """(top, left) of the res x res crop in a new_w x new_h image."""
    if mode == "center":
        return center_offset(new_h, res), center_offset(new_w, res)
    if mode == "random":
        rng = np.random.default_rng(seed)
        return int(rng.integers(0, new_h - res + 1)), int(rng.integers(0, new_w - res + 1))
    raise ValueError(f"crop must be center or random, got {mode!r}")


def same_aspect(a: tuple[int, int], b: tuple[int, int]) -> bool:
    """Sizes that differ only by a rescale (one pixel of rounding on either side allowed)."""
    (aw, ah), (bw, bh) = a, b
    return abs(aw * bh - ah * bw) <= max(aw, bw) + max(ah, bh)


def source_of(stored: tuple[int, int], orig: tuple[int, int], declared: str) -> str:
    """The download mode that made `stored` from `orig`: `declared` (from the download folder's
    record or the config) unless the image was left at its own size or only rescaled."""
    if stored == orig or same_aspect(stored, orig):
        return "rescale"
    if declared in ("center_crop", "border"):
        return declared
    return "center_crop" if stored[0] == stored[1] else "rescale"  # auto: img2dataset's square output


def border_content(stored: tuple[int, int], orig: tuple[int, int]) -> tuple[int, int, int, int]:
    """(left, top, w, h) of the scaled original inside an S x S padded square (albumentations'
    LongestMaxSize then centred PadIfNeeded, as img2dataset's border mode)."""
    side = stored[0]
    scale = side / max(orig)
    w, h = max(1, round(orig[0] * scale)), max(1, round(orig[1] * scale))
    return (side - w) // 2, (side - h) // 2, w, h


def plan(stored: tuple[int, int], orig: tuple[int, int] | None, res: int, declared: str = "auto",
         crop: str = "center", seed: int = 0, allow_upscale: bool = False) -> Plan:
    """The crop of a stored image of size `stored` whose original was `orig` (None: unknown,
    the stored image is taken as the original)."""
    orig, note = trusted_original(stored, orig or stored)
    mode = source_of(stored, orig, declared)
    if mode == "rescale" and not same_aspect(stored, orig):  # no download mode makes this image of that original
        orig, note = stored, ("orig_size_mismatch", f"original {orig[0]}x{orig[1]} recorded, image {stored[0]}x{stored[1]}: "
                                                    "taken as its own original")
    if mode == "center_crop":
        return _center_crop_plan(stored, orig, res, allow_upscale)
    content = border_content(stored, orig) if mode == "border" else (0, 0, *stored)
    need = min(min(orig), min(content[2:]))
    if need < res and not allow_upscale:
        raise TooSmall(f"shorter side {need} < {res} (original {orig[0]}x{orig[1]}, stored {stored[0]}x{stored[1]})")
    frame = resized_size(*orig, res)
    top, left = crop_offsets(*frame, res, crop, seed)
    return Plan(content, frame, (top, left), orig, (top, left), note)


def trusted_original(stored: tuple[int, int], orig: tuple[int, int]) -> tuple[tuple[int, int], tuple[str, str] | None]:
    """The recorded original size, turned when the stored image is the original turned upright:
    the decoder applies EXIF orientation, while img2dataset (OpenCV, unchanged mode) records the
    size before it. (A non-square image whose sides match the original's swapped.)"""
    if stored[0] != stored[1] and not same_aspect(stored, orig) and same_aspect(stored, orig[::-1]):
        turned = (orig[1], orig[0])
        return turned, ("orig_size_rotated", f"original {orig[0]}x{orig[1]} recorded, image {stored[0]}x{stored[1]} "
                                             "(EXIF orientation): taken as turned")
    return orig, None


def _center_crop_plan(stored: tuple[int, int], orig: tuple[int, int], res: int, allow_upscale: bool) -> Plan:
    side = stored[0]  # S: img2dataset scaled the original to shorter side S, then cut S x S
    if min(min(orig), side) < res and not allow_upscale:
        raise TooSmall(f"shorter side {min(min(orig), side)} < {res} (original {orig[0]}x{orig[1]}, "
                       f"stored {stored[0]}x{stored[1]} center crop)")
    scale = side / min(orig)
    scaled_w, scaled_h = round(orig[0] * scale), round(orig[1] * scale)
    top_s, left_s = (scaled_h - side) // 2, (scaled_w - side) // 2  # albumentations CenterCrop
    micro = (int(round(top_s * res / side)), int(round(left_s * res / side)))  # rounded as torchvision's CenterCrop
    return Plan((0, 0, side, side), (res, res), (0, 0), orig, micro)
