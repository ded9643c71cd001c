"""Limits before decode: what img2dataset lacks for hostile web input.

img2dataset reads whole HTTP bodies without a byte cap and decodes the whole image before
its size checks, so one decompression bomb or endless body can take a worker down. These
functions run inside its worker processes (installed by `curate.download.engine`):

  * `Limits.max_bytes` / `max_seconds`: the byte cap and the per-URL deadline that
    `curate.download.fetch` applies while it reads (its module doc: the network guard);
  * `probe` + `check_header`: width, height, EXIF orientation and bit depth come from the
    image *header* (core.image.probe), and over-limit images are refused before decode;
  * `normalize` (core.image): the few layouts OpenCV's decode gets wrong (16-bit grey, EXIF
    rotation, 32-bit/float modes) are converted to 8-bit PNG with PIL first.

Every refusal is a `LimitError` whose message is the ledger reason, e.g.
`too_large:bytes>67108864`, `too_many_pixels:24000x24000>100000000`, `blocked_address: ...`.
"""
from __future__ import annotations

from dataclasses import dataclass

from core import image
from core.image import Header


class LimitError(Exception):
    """An input refused by a limit; str(exc) is the ledger reason."""


@dataclass(frozen=True)
class Limits:
    """Per-image limits, applied before any decode (fields documented in DownloadConfig)."""

    max_bytes: int
    max_pixels: int
    max_aspect_ratio: float
    max_seconds: float

    def __post_init__(self) -> None:
        for name in ("max_bytes", "max_pixels", "max_aspect_ratio", "max_seconds"):
            if getattr(self, name) <= 0:
                raise ValueError(f"limits.{name} must be > 0, got {getattr(self, name)}")


def probe(data: bytes) -> Header:
    """The image header (core.image.probe); an unreadable one is a LimitError with the
    decode-error reason img2dataset's own decoder would give."""
    try:
        return image.probe(data)
    except image.DecodeError as exc:
        raise LimitError(f"Image decoding error: {exc}") from exc


def check_header(header: Header, limits: Limits) -> None:
    """Refuse images whose decode or resize would be too big (pure; raises LimitError)."""
    w, h = header.width, header.height
    if w <= 0 or h <= 0:
        raise LimitError(f"Image decoding error: empty image {w}x{h}")
    if w * h > limits.max_pixels:
        raise LimitError(f"too_many_pixels:{w}x{h}>{limits.max_pixels}")
    if max(w, h) / min(w, h) > limits.max_aspect_ratio:
        raise LimitError(f"aspect_ratio:{w}x{h}>{limits.max_aspect_ratio:g}")
