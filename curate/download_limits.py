"""Limits before decode: what img2dataset lacks for hostile web input.

img2dataset reads whole HTTP bodies without a byte cap and decodes the whole image before
its size checks, so one decompression bomb or endless body can take a worker down. These
functions run inside its worker processes (installed by `curate.download_engine`):

  * `fetch`: the HTTP GET img2dataset would do (same User-Agent with our token, same
    X-Robots-Tag opt-out), but the body is read in chunks under a byte cap and a total
    deadline, and a Content-Length over the cap is refused before any byte is read;
  * `probe` + `check_header`: width, height, EXIF orientation and bit depth come from the
    image *header* (PIL opens lazily), and over-limit images are refused before decode;
  * `normalize`: the few layouts OpenCV's decode gets wrong (16-bit grey, EXIF rotation,
    32-bit/float modes) are converted to 8-bit PNG with PIL first.

Every refusal is a `LimitError` whose message is the ledger reason, e.g.
`too_large:bytes>67108864`, `too_many_pixels:24000x24000>100000000`.
"""
from __future__ import annotations

import io
import time
import urllib.request
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps

# The User-Agent img2dataset sends, with its "compatible" suffix naming our token.
_UA_BASE = "Mozilla/5.0 (X11; Ubuntu; Linux x86_64; rv:72.0) Gecko/20100101 Firefox/72.0"
_CHUNK = 1 << 16  # bytes per read(): small enough to check the deadline often

# PIL modes OpenCV decodes to the right 8-bit picture; anything else goes through `normalize`.
_CV2_SAFE_MODES = frozenset({"1", "L", "LA", "P", "PA", "RGB", "RGBA", "CMYK", "YCbCr"})


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


@dataclass(frozen=True)
class Header:
    """What the image header says, read without decoding pixels."""

    format: str | None  # PIL format name ("JPEG", "PNG", ...)
    mode: str  # PIL mode ("RGB", "I;16", ...)
    width: int
    height: int
    orientation: int  # EXIF orientation tag, 1 = upright
    high_bit_depth: bool  # 16 bits per sample (PIL raw mode ";16")


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
    """Read the header only. PIL's own bomb check is lifted for this call because we apply
    ours right after with the real width and height (resizing runs on one thread per process)."""
    saved, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
    try:
        with Image.open(io.BytesIO(data)) as im:
            orientation = _orientation(im) if "exif" in im.info else 1  # skip the parse when absent
            high = any(";16" in str(getattr(t, "args", "")) for t in (im.tile or []))
            return Header(im.format, im.mode, im.width, im.height, orientation, high)
    except Image.UnidentifiedImageError as exc:  # zero bytes, an HTML page, an unknown format
        raise LimitError("Image decoding error: not an image format PIL can identify") from exc
    except (OSError, ValueError, SyntaxError) as exc:  # PIL raises these for corrupt headers
        raise LimitError(f"Image decoding error: {exc}") from exc
    finally:
        Image.MAX_IMAGE_PIXELS = saved


def check_header(header: Header, limits: Limits) -> None:
    """Refuse images whose decode or resize would be too big (pure; raises LimitError)."""
    w, h = header.width, header.height
    if w <= 0 or h <= 0:
        raise LimitError(f"Image decoding error: empty image {w}x{h}")
    if w * h > limits.max_pixels:
        raise LimitError(f"too_many_pixels:{w}x{h}>{limits.max_pixels}")
    if max(w, h) / min(w, h) > limits.max_aspect_ratio:
        raise LimitError(f"aspect_ratio:{w}x{h}>{limits.max_aspect_ratio:g}")


def needs_normalize(header: Header) -> bool:
    """True when OpenCV's IMREAD_UNCHANGED decode would give a wrong 8-bit picture: EXIF
    rotation (OpenCV ignores it), 16-bit samples (saturated to white), int32/float modes."""
    return header.orientation != 1 or header.high_bit_depth or header.mode not in _CV2_SAFE_MODES


def _to_8bit(im: Image.Image) -> Image.Image:
    if im.mode.startswith("I;16") or im.mode in ("I", "F"):
        a = np.asarray(im, dtype=np.float64)  # (H, W)
        top = 65535.0 if im.mode.startswith("I;16") or a.max() > 255 else 255.0
        return Image.fromarray(np.clip(a * (255.0 / top), 0, 255).round().astype(np.uint8), "L")
    has_alpha = im.mode in ("RGBA", "LA", "PA") or "transparency" in im.info
    return im.convert("RGBA" if has_alpha else "RGB")


def normalize(data: bytes) -> bytes:
    """Decode with PIL (size already checked), apply EXIF rotation and bring samples to
    8 bits; returns a fast lossless PNG for img2dataset's resizer to take over."""
    with Image.open(io.BytesIO(data)) as im:
        im = _to_8bit(ImageOps.exif_transpose(im))  # rotation first: conversions drop EXIF
        out = io.BytesIO()
        im.save(out, "PNG", compress_level=1)
        return out.getvalue()



def _orientation(im: Image.Image) -> int:
    try:
        return int(im.getexif().get(0x0112, 1) or 1)
    except Exception:  # noqa: BLE001  (a broken EXIF block is not a broken image)
        return 1
