"""Decode web image bytes into a PIL image, or fail with a one-line reason for the ledger.

Shared by `near-dup` and `score`: both must treat the same bytes the same way. The pixel
count is read from the header before the full decode, so a decompression bomb is refused
without allocating it; EXIF orientation is applied (a rotated copy is the same picture).
"""
from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageOps

DEFAULT_MAX_PIXELS = 80_000_000  # ~ 9000 x 9000; above this an image is refused, not decoded

# 16-bit and 32-bit integer modes: PIL's convert("L") clips them, so scale them by hand.
_WIDE_MODES = {"I;16": 257.0, "I;16B": 257.0, "I;16L": 257.0, "I;16N": 257.0, "I": 257.0}


class DecodeError(ValueError):
    """The bytes are not a usable image; the message is the ledger reason."""


def open_image(data: bytes | None, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Fully decoded image with EXIF orientation applied; DecodeError says why not."""
    if not data:
        raise DecodeError("empty image (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            if width * height > max_pixels:
                raise DecodeError(f"too many pixels: {width}x{height} > max_pixels={max_pixels}")
            image.load()
            return ImageOps.exif_transpose(image) or image
    except DecodeError:
        raise
    except Image.DecompressionBombError as exc:  # over PIL's own limit (2x MAX_IMAGE_PIXELS)
        raise DecodeError(f"too many pixels (decompression bomb): {exc}") from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise DecodeError(f"undecodable image: {type(exc).__name__}: {exc}") from exc


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB view of any PIL mode: 16-bit scaled (not clipped), transparency over white."""
    if image.mode in _WIDE_MODES:
        arr = np.asarray(image, dtype=np.float64) / _WIDE_MODES[image.mode]
        image = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), mode="L")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        background = Image.new("RGB", image.size, (255, 255, 255))
        background.paste(image.convert("RGBA"), mask=image.convert("RGBA").getchannel("A"))
        return background
    return image if image.mode == "RGB" else image.convert("RGB")
