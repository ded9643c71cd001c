"""Image shards for the neardup / score tests, written with core.imageshard.write_shard.

Real photos from scikit-image (offline), encoded as img2dataset would store them, with
the `.json` fields img2dataset writes (original size, sha256, url, LAION columns)."""
from __future__ import annotations

import hashlib
import io
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from core.imageshard import Sample, write_shard

# Photos whose pHashes are >= 12 bits apart (chelsea and cat are the same picture).
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "camera", "horse", "moon", "brick", "retina")


def photo(name: str) -> Image.Image:
    from skimage import data

    arr = getattr(data, name)()
    if arr.dtype == bool:
        arr = arr.astype(np.uint8) * 255
    return Image.fromarray(arr).convert("RGB")


def jpeg(image: Image.Image, quality: int = 90, size: tuple[int, int] | None = None) -> bytes:
    if size:
        image = image.resize(size)
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def placeholder_png() -> bytes:
    """An "image not available" tile: grey with a dark bar."""
    arr = np.full((120, 160), 200, np.uint8)
    arr[50:70, 20:140] = 60
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    return buf.getvalue()


def sample(key: str, data: bytes, url: str, caption: str = "a photo", ext: str = "jpg", **meta) -> Sample:
    size = {}
    try:
        with Image.open(io.BytesIO(data)) as im:
            size = {"original_width": im.width, "original_height": im.height}
    except Exception:  # broken bytes on purpose: img2dataset would not know the size either
        pass
    info = {"url": url, "caption": caption, "key": key, "status": "success",
            "sha256": hashlib.sha256(data).hexdigest(), "hash": int(key), **size, **meta}
    return Sample(key, data, ext, caption, info)


def write_with_parquet(folder: Path, name: str, samples: list[Sample], extra_success: list[str] = ()) -> Path:
    """Write `name`.tar plus the img2dataset-style `name`.parquet (one row per URL)."""
    path = folder / f"{name}.tar"
    write_shard(path, samples)
    keys = [s.key for s in samples] + list(extra_success)
    pq.write_table(pa.table({"key": keys, "url": [f"http://x/{k}" for k in keys],
                             "status": ["success"] * len(keys)}), folder / f"{name}.parquet")
    return path


def neardup_shards(folder: Path) -> Path:
    """Two shards exercising every neardup rule (expected outcomes in test_neardup.py)."""
    folder.mkdir(parents=True, exist_ok=True)
    astro, coffee = photo("astronaut"), jpeg(photo("coffee"))
    truncated = jpeg(photo("chelsea"))
    ph = placeholder_png()
    write_with_parquet(folder, "00000", [
        sample("000000000", jpeg(astro), "http://a.com/1.jpg", aesthetic=5.0),
        sample("000000001", coffee, "http://b.com/c.jpg", aesthetic=6.0),
        sample("000000002", truncated[: len(truncated) // 2], "http://c.com/t.jpg"),
        sample("000000003", b"", "http://c.com/empty.jpg"),
        sample("000000004", ph, "http://www.h0.com/na.png", ext="png"),
        sample("000000005", jpeg(photo("rocket")), "http://d.com/r.jpg", aesthetic=4.0),
    ])
    write_with_parquet(folder, "00001", [
        sample("000010000", jpeg(astro, 40, (256, 256)), "http://e.com/small.jpg", aesthetic=6.5),
        sample("000010001", coffee, "http://f.com/copy.jpg", aesthetic=6.0),
        sample("000010002", ph, "http://h1.com/na.png", ext="png"),
        sample("000010003", ph, "http://h2.com/na.png", ext="png"),
        sample("000010004", jpeg(astro.crop((8, 8, 504, 504))), "http://g.com/crop.jpg"),
        sample("000010005", jpeg(photo("chelsea")), "http://h.com/cat.jpg", aesthetic=5.5),
    ], extra_success=["000010099"])
    return folder


def score_shard(folder: Path, names: tuple[str, ...] = ("astronaut", "coffee", "chelsea", "rocket")) -> Path:
    """One shard of real photos with captions, plus one undecodable sample."""
    folder.mkdir(parents=True, exist_ok=True)
    samples = [sample(f"{i:09d}", jpeg(photo(n)), f"http://s.com/{n}.jpg", caption=f"a photo of {n}",
                      pwatermark=0.25) for i, n in enumerate(names)]
    samples.append(sample(f"{len(names):09d}", b"<html>not an image</html>", "http://s.com/x.jpg"))
    return write_with_parquet(folder, "00000", samples)
