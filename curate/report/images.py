"""Pictures for the page: thumbnails of samples in image shards, and files already on disk
(check PNGs, sample grids) embedded at a useful size.

Pixels are decoded by `core.image` (the one safe decoder); a shard is read by
`core.imageshard.read_samples`, which seeks past every member it does not need.
"""
from __future__ import annotations

import io
from pathlib import Path

from PIL import Image

from core.image import DecodeError, decode_rgb
from core.imageshard import read_samples

from curate.report.html import Html, esc, img, note



def thumbnails(wanted: dict[Path, set[str]], side: int) -> dict[tuple[str, str], bytes | str]:
    """(shard path, key) -> JPEG thumbnail bytes (longest side `side`), or why there is none."""
    out: dict[tuple[str, str], bytes | str] = {}
    for tar, keys in sorted(wanted.items()):
        if not tar.is_file():
            out.update({(str(tar), k): f"shard {tar.name} is gone" for k in keys})
            continue
        found = read_samples(tar, keys)
        for k in keys:
            out[(str(tar), k)] = _thumb(found[k].image, side) if k in found else f"key {k} is not in {tar.name}"
    return out


def _thumb(data: bytes | None, side: int) -> bytes | str:
    try:
        image = decode_rgb(data)
    except DecodeError as exc:
        return f"undecodable: {exc}"
    image.thumbnail((side, side))
    return _encode(image, "JPEG")


def thumb_html(found: bytes | str | None, alt: str) -> Html:
    """The thumbnail, or a note saying why it is missing."""
    if isinstance(found, bytes):
        return img(found, "image/jpeg", alt)
    return note(found or "not read", "warn")


def embed_file(path: Path, max_width: int, alt: str, min_height: int = 0) -> Html:
    """An image file on disk, shown at a useful size: a small one (a 64 px reconstruction)
    enlarged by a whole factor with nearest-neighbour pixels to at least `min_height`, a wide
    one scaled down to `max_width` (JPEG), any other embedded as it is."""
    data = path.read_bytes()
    try:
        image = decode_rgb(data)
    except DecodeError as exc:
        return note(esc(f"{path.name}: {exc}"), "error")
    if image.height < min_height:
        k = -(-min_height // image.height)
        return img(_encode(image.resize((image.width * k, image.height * k), Image.Resampling.NEAREST), "PNG"),
                   "image/png", alt)
    if image.width > max_width:
        small = image.resize((max_width, round(image.height * max_width / image.width)), Image.Resampling.LANCZOS)
        return img(_encode(small, "JPEG"), "image/jpeg", alt)
    mime = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg"}.get(path.suffix.lower())
    return img(data, mime, alt) if mime else img(_encode(image, "PNG"), "image/png", alt)


def _encode(image: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **({"quality": 88} if fmt == "JPEG" else {}))
    return buf.getvalue()
