"""The one safe image decoder: web image bytes into pixels, or a one-line reason for the ledger.

Every step that looks at pixels goes through here (`curate neardup`, `curate score`,
`pretokenize`, `pretokenize check/fit-vq`, and `curate download`'s checks inside img2dataset's
workers), so the same bytes are treated the same way everywhere:
  * the header is read first (`probe`): size, mode, bit depth and EXIF orientation, without
    decoding pixels, so a decompression bomb is refused before it is allocated;
  * EXIF orientation is applied (a rotated copy is the same picture);
  * 16-bit and 32-bit samples are scaled to 8 bits (`to_8bit`), never clipped to white;
  * transparency is composited over white (`to_rgb`).
"""
from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps

DEFAULT_MAX_PIXELS = 80_000_000  # ~ 9000 x 9000; above this an image is refused, not decoded

# PIL modes OpenCV decodes to the right 8-bit picture; anything else goes through `normalize`.
_CV2_SAFE_MODES = frozenset({"1", "L", "LA", "P", "PA", "RGB", "RGBA", "CMYK", "YCbCr"})


class DecodeError(ValueError):
    """The bytes are not a usable image; the message is the ledger reason."""


@dataclass(frozen=True)
class Header:
    """What the image header says, read without decoding pixels."""

    format: str | None  # PIL format name ("JPEG", "PNG", ...)
    mode: str  # PIL mode ("RGB", "I;16", ...)
    width: int
    height: int
    orientation: int  # EXIF orientation tag, 1 = upright
    high_bit_depth: bool  # 16 bits per sample (PIL raw mode ";16")


def probe(data: bytes) -> Header:
    """Read the header only. PIL's own bomb check is lifted for this call because the caller
    applies its own limit right after, with the real width and height."""
    saved, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
    try:
        with Image.open(io.BytesIO(data)) as im:
            orientation = _orientation(im) if "exif" in im.info else 1  # skip the parse when absent
            high = any(";16" in str(getattr(t, "args", "")) for t in (im.tile or []))
            return Header(im.format, im.mode, im.width, im.height, orientation, high)
    except Image.UnidentifiedImageError as exc:  # zero bytes, an HTML page, an unknown format
        raise DecodeError("not an image format PIL can identify") from exc
    except (OSError, ValueError, SyntaxError) as exc:  # PIL raises these for corrupt headers
        raise DecodeError(str(exc)) from exc
    finally:
        Image.MAX_IMAGE_PIXELS = saved


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
    except Image.UnidentifiedImageError as exc:  # its text names a BytesIO's address: not the same twice
        raise DecodeError("undecodable image: not an image format PIL can identify") from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise DecodeError(f"undecodable image: {type(exc).__name__}: {exc}") from exc


def to_8bit(image: Image.Image) -> Image.Image:
    """16-bit and 32-bit integer or float greys scaled to 8-bit "L" (PIL's convert clips them:
    a 16-bit ramp would come out white); other modes are returned as they are."""
    if not (image.mode.startswith("I;16") or image.mode in ("I", "F")):
        return image
    a = np.asarray(image, dtype=np.float64)  # (H, W)
    top = 65535.0 if image.mode.startswith("I;16") or a.max() > 255 else 255.0
    return Image.fromarray(np.clip(a * (255.0 / top), 0, 255).round().astype(np.uint8), "L")


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB view of any PIL mode: wide samples scaled (not clipped), transparency over white."""
    image = to_8bit(image)
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        background = Image.new("RGB", image.size, (255, 255, 255))
        background.paste(image.convert("RGBA"), mask=image.convert("RGBA").getchannel("A"))
        return background
    return image if image.mode == "RGB" else image.convert("RGB")


def decode_rgb(data: bytes | None, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """`open_image` then `to_rgb`: the decoded, upright RGB picture every image step works on."""
    return to_rgb(open_image(data, max_pixels))


def needs_normalize(header: Header) -> bool:
    """True when OpenCV's IMREAD_UNCHANGED decode (img2dataset's) would give a wrong 8-bit
    picture: EXIF rotation (OpenCV ignores it), 16-bit samples (saturated), int32/float modes."""
    return header.orientation != 1 or header.high_bit_depth or header.mode not in _CV2_SAFE_MODES


def normalize(data: bytes) -> bytes:
    """Decode with PIL (size already checked by the caller), apply EXIF rotation and bring
    samples to 8 bits, keeping alpha; returns a fast lossless PNG for OpenCV to take over."""
    with Image.open(io.BytesIO(data)) as im:
        im = to_8bit(ImageOps.exif_transpose(im))  # rotation first: conversions drop EXIF
        has_alpha = im.mode in ("RGBA", "LA", "PA") or "transparency" in im.info
        im = im.convert("RGBA" if has_alpha else "RGB")
        out = io.BytesIO()
        im.save(out, "PNG", compress_level=1)
        return out.getvalue()


def _orientation(im: Image.Image) -> int:
    try:
        return int(im.getexif().get(0x0112, 1) or 1)
    except Exception:  # noqa: BLE001  (a broken EXIF block is not a broken image)
        return 1
