"""Hostile image bytes: each decodes to a usable RGB image or fails with a reason, never hangs."""
from __future__ import annotations

import io
import zlib
import struct

import numpy as np
import pytest
from PIL import Image

from core.image import DecodeError, decode_rgb, open_image, to_rgb
from curate.images.hashing import phash64


def encode(image: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kw)
    return buf.getvalue()


def bomb_png(side: int, body: bool = True) -> bytes:
    """A greyscale PNG of side x side pixels whose zeros compress to a few hundred KB
    (body=False: the header alone, enough to be refused before any decode)."""
    raw = zlib.compress(b"\x00" * (side + 1) * side, 1) if body else b""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", raw) + chunk(b"IEND", b"")


def good_images() -> dict[str, bytes]:
    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8))
    palette = Image.new("P", (32, 32), 1)
    palette.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90
    frames = [Image.new("RGB", (20, 10), c) for c in ("red", "blue")]
    gif = io.BytesIO()
    frames[0].save(gif, "GIF", save_all=True, append_images=frames[1:])
    return {
        "cmyk_jpeg": encode(rgb.convert("CMYK"), "JPEG"),
        "png16": encode(Image.fromarray((np.arange(64 * 48).reshape(48, 64) * 20).astype(np.uint16)), "PNG"),
        "palette_transparent": encode(palette, "PNG", transparency=0),
        "animated_gif": gif.getvalue(),
        "exif_rotated": encode(rgb, "JPEG", exif=exif),
        "thin_1x20000": encode(Image.new("L", (1, 20000), 128), "PNG"),
    }


@pytest.mark.parametrize("name", list(good_images()))
def test_odd_but_valid_images_decode_to_rgb_and_hash(name: str) -> None:
    image = to_rgb(open_image(good_images()[name]))
    assert image.mode == "RGB" and image.width * image.height > 0
    assert 0 <= phash64(image) < 2**64
    if name == "exif_rotated":
        assert image.size == (48, 64)  # orientation applied: 64x48 stored, shown rotated
    if name == "png16":
        assert np.asarray(image).max() > 200  # scaled from 16 bits, not clipped to white/black


@pytest.mark.parametrize("data, reason", [
    (b"", "empty image"),
    (b"<html><body>Not found</body></html>", "^undecodable image: not an image format PIL can identify$"),  # no address
    (encode(Image.new("RGB", (64, 64)), "JPEG")[:200], "undecodable image"),
    (bomb_png(12000), "too many pixels: 12000x12000 > max_pixels=80000000"),
    (bomb_png(30000, body=False), "too many pixels \\(decompression bomb\\)"),
], ids=["empty", "html", "truncated_jpeg", "bomb_over_max_pixels", "bomb_over_pil_limit"])
def test_bad_bytes_fail_with_a_reason(data: bytes, reason: str) -> None:
    with pytest.raises(DecodeError, match=reason):
        open_image(data, max_pixels=80_000_000)


def test_exif_orientation_is_applied():
    arr = np.zeros((20, 40, 3), np.uint8)  # 40 wide, 20 tall as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90: displayed 20 wide, 40 tall
    img = decode_rgb(encode(Image.fromarray(arr), 'JPEG', exif=exif.tobytes()))
    assert img.size == (20, 40) and img.mode == "RGB"


def test_alpha_composited_on_white():
    rgba = np.zeros((8, 8, 4), np.uint8)  # fully transparent black
    buf = io.BytesIO()
    Image.fromarray(rgba, "RGBA").save(buf, "PNG")
    img = decode_rgb(buf.getvalue())
    assert img.mode == "RGB" and np.all(np.asarray(img) == 255)
    gray = to_rgb(Image.new("L", (4, 4), 7))
    assert gray.mode == "RGB" and np.asarray(gray)[0, 0].tolist() == [7, 7, 7]
