"""Pictures for the page: thumbnails of samples in image shards, and files already on disk
(check PNGs, sample grids) embedded as they are or scaled down when large.

Pixels are decoded by `core.image` (the one safe decoder); the shards are read by
`core.imageshard`, one pass per shard, stopping once every wanted key was seen.
"""
from __future__ import annotations

import io
from pathlib import Path

from core.image import DecodeError, decode_rgb
from core.imageshard import iter_shard

from curate.report.html import Html, esc, img, note

EMBED_AS_IS = 400_000  # bytes: a PNG up to this size is embedded unchanged


def thumbnails(wanted: dict[Path, set[str]], side: int) -> dict[tuple[str, str], bytes | str]:
    """(shard path, key) -> JPEG thumbnail bytes (longest side `side`), or why there is none."""
    out: dict[tuple[str, str], bytes | str] = {}
    for tar, keys in sorted(wanted.items()):
        if not tar.is_file():
            out.update({(str(tar), k): f"shard {tar.name} is gone" for k in keys})
            continue
        left = set(keys)
        for sample in iter_shard(tar):
            if sample.key in left:
                left.discard(sample.key)
                out[(str(tar), sample.key)] = _thumb(sample.image, side)
                if not left:
                    break
        out.update({(str(tar), k): f"key {k} is not in {tar.name}" for k in left})
    return out


def _thumb(data: bytes | None, side: int) -> bytes | str:
    try:
        image = decode_rgb(data)
    except DecodeError as exc:
        return f"undecodable: {exc}"
    image.thumbnail((side, side))
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=85)
    return buf.getvalue()


def thumb_html(found: bytes | str | None, alt: str) -> Html:
    """The thumbnail, or a note saying why it is missing."""
    if isinstance(found, bytes):
        return img(found, "image/jpeg", alt)
    return note(found or "not read", "warn")


def embed_file(path: Path, max_width: int, alt: str) -> Html:
    """An image file on disk: as it is when small, else decoded and scaled to `max_width`."""
    data = path.read_bytes()
    if len(data) <= EMBED_AS_IS and path.suffix.lower() == ".png":
        return img(data, "image/png", alt)
    try:
        image = decode_rgb(data)
    except DecodeError as exc:
        return note(esc(f"{path.name}: {exc}"), "error")
    if image.width > max_width:
        image = image.resize((max_width, round(image.height * max_width / image.width)))
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=88)
    return img(buf.getvalue(), "image/jpeg", alt)
