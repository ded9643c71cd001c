"""Near-dup pass 1, per shard: decode each image once and record what grouping needs.

One HASH_SCHEMA row per sample of the shard (samples the tar lost, per its parquet, included
with their reason): sha256 (32 bytes, binary: half the size of hex text, and compared as
bytes), 64-bit pHash (imagehash), URL host, aesthetic and original size. An undecodable image
gets a row with its `error` and no pHash. The shard may be local or on an object store (read
as a stream), and so may the part written (core.storage, core.atomic).
"""
from __future__ import annotations

import hashlib
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import pyarrow as pa

from core import atomic, laion, storage
from core.image import DecodeError, open_image
from core.imageshard import MAX_MEMBER_BYTES, ReadReport, iter_shard

# One row per sample read (or listed as a success in the shard's parquet but missing from the tar).
HASH_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("shard", pa.string()),  # the tar's file name, e.g. "00012.tar"
        ("row", pa.int64()),  # position in the shard (read order)
        ("sha256", pa.binary(32)),  # of the image bytes (img2dataset's, else computed)
        ("phash", pa.uint64()),  # imagehash.phash, 8x8 bits row-major, first bit = most significant
        ("host", pa.string()),  # URL host without "www.", for placeholder detection
        ("aesthetic", pa.float64()),
        ("width", pa.int64()),  # original_width from the sample json, else the decoded width
        ("height", pa.int64()),
        ("error", pa.string()),  # why the image could not be hashed; null when it was
    ]
)


def phash64(image: Any) -> int:
    """imagehash.phash of a PIL image as an unsigned 64-bit int (row-major bits, MSB first)."""
    import imagehash

    bits = imagehash.phash(image).hash.flatten()  # (64,) bool
    return int.from_bytes(np.packbits(bits).tobytes(), "big")


def url_host(url: Any) -> str | None:
    """Lower-case host of a URL without a leading "www."; None when there is none."""
    if not isinstance(url, str) or not url:
        return None
    try:
        host = urlsplit(url).hostname
    except ValueError:
        return None
    return host.removeprefix("www.") if host else None


def sha256_bytes(recorded: Any, data: bytes) -> bytes:
    """The image's sha256 as 32 bytes: img2dataset's hex digest from the sample json, or the
    digest of the bytes when the json has none (or not a valid one)."""
    if isinstance(recorded, str) and len(recorded) == 64:
        try:
            return bytes.fromhex(recorded)
        except ValueError:
            pass
    return hashlib.sha256(data).digest()


def hash_sample(sample: Any, shard: str, row: int, max_pixels: int, cache: dict[bytes, int]) -> dict[str, Any]:
    """One HASH_SCHEMA row for a sample; `cache` maps sha256 -> pHash within the shard."""
    meta = sample.meta or {}
    data = sample.image or b""
    sha = sha256_bytes(meta.get("sha256"), data)
    aesthetic = laion.score_value(meta, "aesthetic")
    rec = {"key": sample.key, "shard": shard, "row": row, "sha256": sha, "host": url_host(meta.get("url")),
           "aesthetic": aesthetic, "phash": None, "error": None,
           "width": meta.get("original_width"), "height": meta.get("original_height")}
    if sha in cache:
        rec["phash"] = cache[sha]
        return rec
    try:
        image = open_image(data, max_pixels)
    except DecodeError as exc:
        rec["error"] = str(exc)
        return rec
    rec["phash"] = cache[sha] = phash64(image)
    rec["width"] = rec["width"] or image.width
    rec["height"] = rec["height"] or image.height
    return rec


def hash_shard(shard: str, part: str, max_pixels: int, max_member_bytes: int = MAX_MEMBER_BYTES) -> dict[str, Any]:
    """Hash every sample of one shard into `part` (atomic); returns the shard's read report."""
    shard, part = storage.path(shard), storage.path(part)
    report = ReadReport(str(shard))
    cache: dict[bytes, int] = {}
    records = [hash_sample(s, shard.name, i, max_pixels, cache) for i, s in enumerate(iter_shard(shard, report, max_member_bytes))]
    records += [{"key": k, "shard": shard.name, "row": len(records) + i, "error": f"{kind}: {why}"}
                for i, (k, kind, why) in enumerate(report.unread())]
    table = pa.Table.from_pylist(records, schema=HASH_SCHEMA)
    atomic.write_parquet(part, table)
    return {"rows": table.num_rows, "damaged": report.damaged, "refused": len(report.refused), "lost": len(report.lost),
            "duplicates": len(report.duplicates)}
