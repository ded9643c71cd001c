"""`curate synth`: LAION-like metadata for tests, the demo and benchmarks.

Columns and dtypes follow laion2B-en joined with its aesthetic scores:
    URL string, TEXT string, WIDTH double, HEIGHT double, similarity double,
    hash int64 (= mmh3.hash64((URL+TEXT).encode())[0]), punsafe float, pwatermark float,
    aesthetic float
Planted problems, so every step has something to do:
  - duplicates of URLs across files (`dup_rate`): same URL with another caption and other
    scores, a third of them with the same caption too (same `hash`), a third whitespace-padded;
  - missing scores (`missing_rate`): NaN or null aesthetic/similarity, null pwatermark/punsafe;
  - a few rows with null URL or null TEXT (`null_rate`, at least one of each per file of >= 100 rows).
Everything is vectorised (numpy/pyarrow), LAION's hash included (core.laion), so 10M rows
take seconds. Row content is a pure function of (seed, global row id).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from core import atomic
from core.laion import hash64

# A small vocabulary; "cafe\u0301" is a decomposed (non-NFC) word so caption normalisation has work.
VOCAB = (
    "a an the photo picture image of with and on in at by for from over under near "
    "red blue green yellow black white golden small large old new bright dark vintage "
    "dog cat bird horse car bicycle house tree flower mountain river beach city street "
    "woman man child people table chair window door book cup plate bread cake coffee "
    "sunset morning night winter summer autumn spring snow rain light shadow sky cloud "
    "painting drawing poster logo illustration texture pattern wooden metal glass stone "
    "modern rustic cozy quiet busy empty portrait landscape closeup aerial view detail cafe\u0301"
).split()


@dataclass
class SynthConfig:
    rows: int = 100_000  # total rows over all files
    files: int = 4  # number of parquet files (rows are split evenly)
    seed: int = 0  # same seed -> same bytes
    dup_rate: float = 0.1  # share of rows that reuse another row's URL
    missing_rate: float = 0.02  # share of rows with a missing score (per score column)
    null_rate: float = 0.0001  # share of rows with a null URL, and again with a null TEXT
    caption_rate: float = 0.6  # captions table: share of URLs with a long caption

    def __post_init__(self) -> None:
        if self.rows < 0 or self.files < 1:
            raise ValueError(f"rows must be >= 0 and files >= 1, got rows={self.rows} files={self.files}")
        for name in ("dup_rate", "missing_rate", "null_rate", "caption_rate"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must lie in [0, 1], got {getattr(self, name)}")


def mix(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser: a well-spread uint64 hash of uint64 ids (vectorised)."""
    x = x.astype(np.uint64, copy=True)
    with np.errstate(over="ignore"):
        x ^= x >> np.uint64(30)
        x *= np.uint64(0xBF58476D1CE4E5B9)
        x ^= x >> np.uint64(27)
        x *= np.uint64(0x94D049BB133111EB)
        x ^= x >> np.uint64(31)
    return x


def url_of(ids: np.ndarray) -> pa.Array:
    """The canonical URL of each id: https://img<id % 97>.example.com/photos/<id>.jpg."""
    host = pa.array((ids % 97).astype(np.int64)).cast(pa.string())
    name = pa.array(ids.astype(np.int64)).cast(pa.string())
    return pc.binary_join_element_wise("https://img", host, ".example.com/photos/", name, ".jpg", "")


def words_of(ids: np.ndarray, seed: int, lo: int, hi: int) -> pa.Array:
    """A caption of lo..hi-1 vocabulary words per id, a pure function of (seed, id)."""
    ids = ids.astype(np.uint64)
    salt = np.uint64(seed * 1_000_003 + lo * 7919 + hi)
    lengths = (lo + mix(ids ^ salt) % np.uint64(hi - lo)).astype(np.int64)  # (N,)
    offsets = np.zeros(len(ids) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    owner = np.repeat(ids, lengths)  # (total words,)
    position = np.arange(offsets[-1], dtype=np.int64) - np.repeat(offsets[:-1], lengths)
    with np.errstate(over="ignore"):
        word = mix(owner * np.uint64(131) + position.astype(np.uint64) + salt) % np.uint64(len(VOCAB))
    values = pa.array(VOCAB).take(pa.array(word.astype(np.int64)))
    return pc.binary_join(pa.ListArray.from_arrays(pa.array(offsets), values), " ")


def _with_nulls(values: pa.Array, mask: np.ndarray) -> pa.Array:
    return pc.if_else(pa.array(mask), pa.nulls(len(values), values.type), values)


def _scores(rng: np.random.Generator, n: int, missing: float) -> dict[str, pa.Array]:
    """Score columns with LAION's dtypes and planted NaN/null values."""
    aes = np.clip(rng.normal(5.0, 0.9, n), 1.0, 10.0).astype(np.float32)
    sim = np.clip(rng.normal(0.32, 0.04, n), 0.0, 1.0)
    aes[rng.random(n) < missing / 2] = np.nan  # NaN and null both occur in the wild
    sim[rng.random(n) < missing / 2] = np.nan
    sides = np.array([256, 320, 400, 480, 512, 600, 640, 768, 800, 1024, 1200, 1600, 2048], float)
    return {
        "WIDTH": pa.array(rng.choice(sides, n)),
        "HEIGHT": pa.array(rng.choice(sides, n)),
        "similarity": _with_nulls(pa.array(sim), rng.random(n) < missing / 2),
        "punsafe": _with_nulls(pa.array(rng.beta(0.3, 6.0, n).astype(np.float32)), rng.random(n) < missing),
        "pwatermark": _with_nulls(pa.array(rng.beta(0.6, 2.5, n).astype(np.float32)), rng.random(n) < missing),
        "aesthetic": _with_nulls(pa.array(aes), rng.random(n) < missing / 2),
    }


def _null_mask(rng: np.random.Generator, n: int, rate: float) -> np.ndarray:
    mask = rng.random(n) < rate
    if n >= 100 and rate > 0 and not mask.any():
        mask[rng.integers(n)] = True  # a few null rows in every file of any size
    return mask


def make_file(cfg: SynthConfig, start: int, stop: int) -> pa.Table:
    """Rows [start, stop) of the global row ids as a LAION-like table."""
    n = stop - start
    rng = np.random.default_rng([cfg.seed, start])
    ids = np.arange(start, stop, dtype=np.int64)
    dup = rng.random(n) < cfg.dup_rate
    src = np.where(dup, rng.integers(0, max(cfg.rows, 1), n), ids)  # whose URL this row carries
    kind = rng.integers(0, 3, n)  # among duplicates: 0 other caption, 1 same caption, 2 padded URL
    urls = url_of(src)
    padded = pc.binary_join_element_wise(" ", urls, " \n", "")
    urls = pc.if_else(pa.array(dup & (kind == 2)), padded, urls)
    texts = words_of(np.where(dup & (kind == 1), src, ids), cfg.seed, 3, 21)  # kind 1 copies the caption
    urls = _with_nulls(urls, _null_mask(rng, n, cfg.null_rate))
    texts = _with_nulls(texts, _null_mask(rng, n, cfg.null_rate))
    cols = {"URL": urls, "TEXT": texts}
    scores = _scores(rng, n, cfg.missing_rate)
    cols.update({k: scores[k] for k in ("WIDTH", "HEIGHT", "similarity")})
    cols["hash"] = hash64(urls, texts)
    cols.update({k: scores[k] for k in ("punsafe", "pwatermark", "aesthetic")})
    return pa.table(cols)


def make_captions(cfg: SynthConfig) -> pa.Table:
    """A long-caption table (`url`, `caption`) in the style of ShareGPT4V/PixelProse: captions of
    20-119 words for `caption_rate` of the URLs, a second caption for some (one-to-many), some
    with tabs/double spaces, all keyed by the clean URL."""
    ids = np.arange(cfg.rows, dtype=np.int64)
    pick = mix(ids.astype(np.uint64) ^ np.uint64(cfg.seed + 17)) % np.uint64(1000) < np.uint64(cfg.caption_rate * 1000)
    ids = ids[pick]
    second = ids[mix(ids.astype(np.uint64) + np.uint64(99)) % np.uint64(20) == 0]  # 5% get two captions
    keys = np.concatenate([ids, second])
    first = words_of(ids, cfg.seed + 1, 20, 120)
    extra = words_of(second, cfg.seed + 2, 20, 120)
    captions = pa.concat_arrays([first, extra])
    messy = mix(keys.astype(np.uint64) + np.uint64(5)) % np.uint64(10) == 0
    captions = pc.if_else(pa.array(messy), pc.replace_substring(captions, " ", " \t ", max_replacements=3), captions)
    return pa.table({"url": url_of(keys), "caption": captions})


def run(cfg: SynthConfig, output: str | os.PathLike, captions_output: str | os.PathLike | None = None) -> dict:
    """Write `files` parquet files to `output` (and the captions table); returns a summary."""
    from core.progress import track

    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    bounds = np.linspace(0, cfg.rows, cfg.files + 1).astype(np.int64)
    written = []
    for f in track(range(cfg.files), "synth", total=cfg.files):
        path = out / f"part-{f:05d}.parquet"
        atomic.write_parquet(path, make_file(cfg, int(bounds[f]), int(bounds[f + 1])))
        written.append(str(path))
    summary = {"rows": cfg.rows, "files": written}
    if captions_output:
        caps = make_captions(cfg)
        atomic.write_parquet(captions_output, caps)
        summary["captions"] = {"path": str(captions_output), "rows": caps.num_rows}
    return summary
