"""The LAION metadata schema, once: column names, aliases, dtypes and the `hash` formula.

laion2B-en (joined with its aesthetic table) names its columns
    URL string, TEXT string, WIDTH double, HEIGHT double, similarity double,
    hash int64, punsafe float, pwatermark float, aesthetic float
The LAION-5B "improved aesthetics" releases call the aesthetic score `AESTHETIC_SCORE`; every
reader goes through `stored_name` (files) or `score_value` (a sample's .json) to find it.

`hash` is LAION's own row id: `mmh3.hash64((URL + TEXT).encode())[0]` (MurmurHash3 x64-128,
seed 0, first half as a signed int64; a null part counts as ""). Raw laion2B-en ships without
it, so it is computed for 18M-row files: `hash64` does it in numpy over Arrow's buffers, in
bounded batches, with no Python object per row (the per-row `mmh3` call it replaces built a
string per row: ~433 B/row, ~7 GiB for one file).
"""
from __future__ import annotations

import math
from typing import Any, Iterable, Mapping

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

URL, TEXT, WIDTH, HEIGHT, HASH = "URL", "TEXT", "WIDTH", "HEIGHT", "hash"

# The aesthetic score's names, in order of preference (`aesthetic` wins when a file has both).
AESTHETIC_NAMES = ("aesthetic", "AESTHETIC_SCORE")
# Score columns and their aliases.
SCORE_NAMES: dict[str, tuple[str, ...]] = {
    "aesthetic": AESTHETIC_NAMES,
    "pwatermark": ("pwatermark",),
    "punsafe": ("punsafe",),
    "similarity": ("similarity",),
}

SCHEMA = pa.schema([
    (URL, pa.string()), (TEXT, pa.string()), (WIDTH, pa.float64()), (HEIGHT, pa.float64()),
    ("similarity", pa.float64()), (HASH, pa.int64()), ("punsafe", pa.float32()),
    ("pwatermark", pa.float32()), ("aesthetic", pa.float32()),
])


def stored_name(columns: Iterable[str], name: str) -> str | None:
    """The name under which a file stores column `name` (case-insensitive, as duckdb matches;
    `aesthetic` also as AESTHETIC_SCORE), or None."""
    by_lower = {c.lower(): c for c in reversed(list(columns))}  # first spelling wins
    for alias in SCORE_NAMES.get(name, (name,)):
        if alias.lower() in by_lower:
            return by_lower[alias.lower()]
    return None


def finite(value: Any) -> float | None:
    """A real, finite number as float; None for null, NaN, ±inf, booleans and text."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def score_value(meta: Mapping[str, Any], name: str) -> float | None:
    """Score `name` from a sample's metadata (.json), by its aliases; None when absent or not finite."""
    for alias in SCORE_NAMES.get(name, (name,)):
        value = finite(meta.get(alias))
        if value is not None:
            return value
    return None


# ---------------------------------------------------------------- the hash

_C1, _C2 = np.uint64(0x87C37B91114253D5), np.uint64(0x4CF5AD432745937F)
_M1, _M2 = np.uint64(0xFF51AFD7ED558CCD), np.uint64(0xC4CEB9FE1A85EC53)
_N1, _N2 = np.uint64(0x52DCE729), np.uint64(0x38495AB5)
BATCH_ROWS = 65_536  # rows per vectorised batch: bounds the working copy to the batch's bytes


def _rotl(x: np.ndarray, r: int) -> np.ndarray:
    return (x << np.uint64(r)) | (x >> np.uint64(64 - r))


def _fmix(k: np.ndarray) -> np.ndarray:
    k = k ^ (k >> np.uint64(33))
    k = k * _M1
    k = k ^ (k >> np.uint64(33))
    k = k * _M2
    return k ^ (k >> np.uint64(33))


def _mix_k1(k1: np.ndarray) -> np.ndarray:
    return _rotl(k1 * _C1, 31) * _C2


def _mix_k2(k2: np.ndarray) -> np.ndarray:
    return _rotl(k2 * _C2, 33) * _C1


def _loader(data: np.ndarray):
    """`load(p, nbytes)`: the little-endian uint64 of `nbytes` (0-8) bytes of `data` at byte
    offsets `p`, bytes past `nbytes` zeroed. Unaligned loads are two aligned word reads and
    shifts, so no per-byte work is done."""
    words = np.zeros(data.size // 8 + 4, np.uint64)  # spare words: reads past the end (a tail block) see zeros
    words.view(np.uint8)[:data.size] = data

    def load(p: np.ndarray, nbytes: np.ndarray | int = 8) -> np.ndarray:
        q, s = p >> 3, (p & 7).astype(np.uint64) * np.uint64(8)
        hi = np.where(s == 0, np.uint64(0), words[q + 1] << ((np.uint64(64) - s) & np.uint64(63)))
        w = (words[q] >> s) | hi
        keep = np.asarray(nbytes, np.uint64) * np.uint64(8)
        mask = np.where(keep >= 64, ~np.uint64(0), (np.uint64(1) << (keep & np.uint64(63))) - np.uint64(1))
        return w & mask

    return load


def murmur3_x64_64(data: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """First 64 bits of MurmurHash3_x64_128 (seed 0) of each byte string, as int64 (= mmh3.hash64(s)[0]).
    `data`: (bytes,) uint8, `offsets`: (n+1,) int64 as Arrow's binary layout. Vectorised: one
    pass per 16-byte block over the rows that still have a block."""
    starts, lengths = offsets[:-1].astype(np.int64), np.diff(offsets).astype(np.int64)
    load = _loader(data)
    h1 = np.zeros(lengths.size, np.uint64)
    h2 = np.zeros(lengths.size, np.uint64)
    nblocks = lengths // 16
    with np.errstate(over="ignore"):  # uint64 arithmetic is meant to wrap (mod 2**64)
        for j in range(int(nblocks.max(initial=0))):
            act = np.flatnonzero(nblocks > j)  # rows with a full block j
            p = starts[act] + 16 * j
            a1, a2 = h1[act] ^ _mix_k1(load(p)), h2[act]
            a1 = (_rotl(a1, 27) + a2) * np.uint64(5) + _N1
            a2 = a2 ^ _mix_k2(load(p + 8))
            a2 = (_rotl(a2, 31) + a1) * np.uint64(5) + _N2
            h1[act], h2[act] = a1, a2
        tail, p = lengths % 16, starts + 16 * nblocks
        h2 = np.where(tail > 8, h2 ^ _mix_k2(load(p + 8, np.clip(tail - 8, 0, 8))), h2)
        h1 = np.where(tail > 0, h1 ^ _mix_k1(load(p, np.minimum(tail, 8))), h1)
        n = lengths.astype(np.uint64)
        h1, h2 = h1 ^ n, h2 ^ n
        h1 = h1 + h2
        h2 = h2 + h1
        h1, h2 = _fmix(h1), _fmix(h2)
        h1 = h1 + h2
    return h1.view(np.int64)


def _large_binary(a: pa.Array | pa.ChunkedArray) -> pa.Array | pa.ChunkedArray:
    """Text or binary as large_binary, bytes as stored (text is not re-checked for UTF-8)."""
    if pa.types.is_string(a.type) or pa.types.is_large_string(a.type):
        a = a.cast(pa.large_string())
        return a.view(pa.large_binary()) if isinstance(a, pa.Array) else pa.chunked_array(
            [c.view(pa.large_binary()) for c in a.chunks], pa.large_binary())
    return a.cast(pa.large_binary())


def hash64(urls: pa.Array | pa.ChunkedArray, texts: pa.Array | pa.ChunkedArray,
           batch_rows: int = BATCH_ROWS) -> pa.Array:
    """LAION's `hash` of each (URL, TEXT) row (null parts count as ""), as an int64 array;
    computed `batch_rows` rows at a time, so memory stays bounded for any file. Text or binary
    columns: the bytes as stored are hashed."""
    urls, texts = (_large_binary(a) for a in (urls, texts))  # null-typed or >2 GB columns too
    empty = pa.scalar(b"", pa.large_binary())
    joined = pc.binary_join_element_wise(pc.fill_null(urls, empty), pc.fill_null(texts, empty), empty)
    joined = joined.combine_chunks() if isinstance(joined, pa.ChunkedArray) else joined
    out = np.empty(len(joined), dtype=np.int64)
    for start in range(0, len(joined), batch_rows):
        part = joined.slice(start, batch_rows)
        _, off_buf, data_buf = part.buffers()
        offsets = np.frombuffer(off_buf, np.int64)[part.offset: part.offset + len(part) + 1]
        data = np.frombuffer(data_buf, np.uint8) if data_buf is not None else np.zeros(0, np.uint8)
        data = data[offsets[0]:offsets[-1]]  # only this batch's bytes
        out[start:start + len(part)] = murmur3_x64_64(data, offsets - offsets[0])
    return pa.array(out, pa.int64())


def row_hash(url: str | None, text: str | None) -> int:
    """`hash64` of one row (for code that meets rows one at a time, e.g. a sample's .json)."""
    return int(hash64(pa.array([url], pa.string()), pa.array([text], pa.string()))[0].as_py())
