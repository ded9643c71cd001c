"""Benchmark of LAION's row hash (`core.laion.hash64`) against the loop a user would write.

`hash64` computes `mmh3.hash64((URL + TEXT).encode())[0]` for whole Arrow columns: the columns
are joined as bytes in Arrow and `mmh3` is called on each row's bytes, 65,536 rows a batch, so
raw laion2B-en files (no `hash` column) are hashed with bounded memory. Measured, on rows shaped
like LAION's (URL 35-135 bytes, caption 10-250 bytes), built from numpy buffers so no Python
object per row exists before the hashing starts:

  * speed: rows/s of `hash64` and, as the baseline in the same run, of the plain loop over
    `to_pylist()` of both columns (`mmh3.hash64((u + t).encode())[0]`), medians of repeats;
  * long rows: a 65,536-row batch with one 10 KB and with one 1 MB caption, against the typical
    batch (the numpy MurmurHash3 `hash64` used before made one pass per 16-byte block over the
    batch, so one 1 MB caption cost its batch 13.4 s instead of 0.3 s);
  * memory: peak RSS over the input's, of each way at --rows/4 and --rows rows, in fresh
    processes (flat in the rows: bounded).

    .venv/bin/python bench/laion_hash.py [--rows 2000000] [--repeats 5]
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from core import laion  # noqa: E402


def strings(lengths: np.ndarray, rng: np.random.Generator) -> pa.Array:
    """A string array of random lowercase text with these lengths, built from buffers."""
    offsets = np.zeros(lengths.size + 1, np.int32)
    np.cumsum(lengths, out=offsets[1:])
    data = rng.integers(ord("a"), ord("z") + 1, int(offsets[-1]), dtype=np.uint8)
    return pa.Array.from_buffers(pa.string(), lengths.size, [None, pa.py_buffer(offsets), pa.py_buffer(data)])


def columns(n: int, seed: int = 0, long_caption: int = 0) -> tuple[pa.Array, pa.Array]:
    rng = np.random.default_rng(seed)
    text_len = rng.integers(10, 250, n)
    if long_caption:
        text_len[-1] = long_caption
    return strings(rng.integers(35, 135, n), rng), strings(text_len, rng)


def plain_loop(urls: pa.Array, texts: pa.Array) -> list[int]:
    import mmh3

    return [mmh3.hash64(((u or "") + (t or "")).encode())[0] for u, t in zip(urls.to_pylist(), texts.to_pylist())]


def hash64(urls: pa.Array, texts: pa.Array) -> pa.Array:
    return laion.hash64(urls, texts)


WAYS = {"hash64": hash64, "plain_loop": plain_loop}


def median_s(fn, repeats: int, *args) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _peak_child(way: str, n: int, q) -> None:
    """Peak RSS over the hashing, sampled every 2 ms by a thread (ru_maxrss would report the
    building of the input, which peaks higher than either way of hashing it)."""
    import threading

    import psutil

    urls, texts = columns(n)
    me, peak, done = psutil.Process(), [0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], me.memory_info().rss)
            time.sleep(0.002)

    base = me.memory_info().rss
    t = threading.Thread(target=sample)
    t.start()
    WAYS[way](urls, texts)
    done.set()
    t.join()
    q.put((base, max(peak[0], me.memory_info().rss)))


def peak_mib(way: str, n: int) -> tuple[float, float]:
    """(RSS with the input built, peak RSS while hashing) in MiB, in a fresh process."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_peak_child, args=(way, n, q))
    p.start()
    base, peak = q.get()
    p.join()
    return base / 2**20, peak / 2**20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=2_000_000, help="rows for the speed and memory runs")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    print(f"machine: {platform.machine()}, {mp.cpu_count()} cores, Python {platform.python_version()}")

    urls, texts = columns(args.rows)
    assert hash64(urls, texts).to_pylist() == plain_loop(urls, texts)  # same hashes, or nothing to compare
    t_h, t_p = median_s(hash64, args.repeats, urls, texts), median_s(plain_loop, args.repeats, urls, texts)
    print(f"speed, {args.rows:,} rows: hash64 {args.rows / t_h / 1e6:.2f} M rows/s, plain loop "
          f"{args.rows / t_p / 1e6:.2f} M rows/s (hash64 {t_p / t_h:.2f}x as fast)")

    n = laion.BATCH_ROWS
    base = median_s(hash64, args.repeats, *columns(n, seed=1))
    line = [f"one {n:,}-row batch: typical {base * 1e3:.0f} ms"]
    for label, size in (("one 10 KB caption", 10_000), ("one 1 MB caption", 1_000_000)):
        s = median_s(hash64, args.repeats, *columns(n, seed=1, long_caption=size))
        line.append(f"with {label} {s * 1e3:.0f} ms ({s / base:.2f}x)")
    print("; ".join(line))

    for way in WAYS:  # flat in the rows = bounded; growing with them = per-row objects
        over = []
        for n in (args.rows // 4, args.rows):
            b, p = peak_mib(way, n)
            over.append(f"{p - b:.0f} MiB at {n:,} rows")
        print(f"peak RSS over the input's, {way}: " + ", ".join(over))


if __name__ == "__main__":
    main()
