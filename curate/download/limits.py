"""Limits before decode: what img2dataset lacks for hostile web input.

img2dataset reads whole HTTP bodies without a byte cap and decodes the whole image before
its size checks, so one decompression bomb or endless body can take a worker down. These
functions run inside its worker processes (installed by `curate.download.engine`):

  * `fetch`: the HTTP GET img2dataset would do (same User-Agent with our token, same
    X-Robots-Tag opt-out), but the body is read in chunks under a byte cap and a total
    deadline, and a Content-Length over the cap is refused before any byte is read;
  * `probe` + `check_header`: width, height, EXIF orientation and bit depth come from the
    image *header* (core.image.probe), and over-limit images are refused before decode;
  * `normalize` (core.image): the few layouts OpenCV's decode gets wrong (16-bit grey, EXIF
    rotation, 32-bit/float modes) are converted to 8-bit PNG with PIL first.

Every refusal is a `LimitError` whose message is the ledger reason, e.g.
`too_large:bytes>67108864`, `too_many_pixels:24000x24000>100000000`.
"""
from __future__ import annotations

import time
import urllib.request
from dataclasses import dataclass

from core import image
from core.image import Header

# The User-Agent img2dataset sends, with its "compatible" suffix naming our token.
_UA_BASE = "Mozilla/5.0 (X11; Ubuntu; Linux x86_64; rv:72.0) Gecko/20100101 Firefox/72.0"
_CHUNK = 1 << 16  # bytes per read(): small enough to check the deadline often



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


def user_agent(token: str | None) -> str:
    if not token:
        return _UA_BASE
    return f"{_UA_BASE} (compatible; {token}; +https://github.com/rom1504/img2dataset)"


def read_capped(stream, max_bytes: int, deadline: float) -> bytes:
    """Read `stream` to its end, refusing more than `max_bytes` or past `deadline` (monotonic)."""
    buf = bytearray()
    while True:
        if time.monotonic() > deadline:
            raise TimeoutError("timed out: body not received within the download deadline")
        # read1: return whatever arrived (read() would block until the whole chunk is in,
        # so a server trickling one byte per second could hold us for hours).
        chunk = stream.read1(min(_CHUNK, max_bytes + 1 - len(buf)))
        if not chunk:
            return bytes(buf)
        buf += chunk
        if len(buf) > max_bytes:
            raise LimitError(f"too_large:bytes>{max_bytes}")


def fetch(url: str, timeout: float, token: str | None, disallowed, limits: Limits, is_disallowed) -> bytes:
    """GET `url` as img2dataset does, under the byte cap and deadline; raises on any failure.

    `disallowed` / `is_disallowed` are img2dataset's X-Robots-Tag directives and checker,
    passed in so its opt-out semantics stay exactly as upstream."""
    if not isinstance(url, str) or not url.strip():
        raise LimitError(f"bad_url: {url!r}")
    deadline = time.monotonic() + limits.max_seconds
    request = urllib.request.Request(url, data=None, headers={"User-Agent": user_agent(token)})
    with urllib.request.urlopen(request, timeout=timeout) as r:
        if disallowed and is_disallowed(r.headers, token, disallowed):
            raise LimitError("Use of image disallowed by X-Robots-Tag directive")
        length = r.headers.get("Content-Length")
        if length and length.strip().isdigit() and int(length) > limits.max_bytes:
            raise LimitError(f"too_large:bytes>{limits.max_bytes}")
        return read_capped(r, limits.max_bytes, deadline)


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
