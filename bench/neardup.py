"""Benchmark of near-duplicate grouping (curate.mih): speed, growth, memory and exactness.

Input: n random 64-bit hashes; 20% of them are copies of others with 0..d bits flipped
(planted near-duplicates, every distance 0..d), 5% with d+1..d+2 bits flipped (must NOT join).

  * growth: wall time of `group_labels` at n = 125k, 250k, 500k, 1M (median of repeats), for
    the automatic band choice and, as the baseline in the same run, classic MIH (d+1 bands);
    time / (n log2 n) normalised to the smallest n shows the growth;
  * memory: peak RSS of grouping 1M hashes, measured in a fresh child process;
  * exactness: on a 20k subset, the pairs found (auto and classic) against brute force over
    all pairs (recall and precision), and the groups against scipy's connected components.

    .venv/bin/python bench/neardup.py [--small] [--distance 4] [--repeats 3]
"""
from __future__ import annotations

import argparse
import math
import multiprocessing as mp
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from curate.images import mih  # noqa: E402


def planted_hashes(n: int, d: int, seed: int = 0) -> np.ndarray:
    """n hashes: 75% random, 20% within distance 0..d of one of them, 5% at d+1..d+2."""
    rng = np.random.default_rng(seed)
    n_near, n_far = n // 5, n // 20
    base = rng.integers(0, np.iinfo(np.uint64).max, size=n - n_near - n_far, dtype=np.uint64, endpoint=True)
    src = base[rng.integers(0, base.size, n_near + n_far)]
    flips = np.concatenate([rng.integers(0, d + 1, n_near), rng.integers(d + 1, d + 3, n_far)])
    noise = np.zeros(src.size, dtype=np.uint64)
    for k in range(1, d + 3):  # set k random distinct bits on the rows that need k flips
        rows = np.flatnonzero(flips == k)
        for r in rows:
            noise[r] = np.uint64(sum(1 << int(b) for b in rng.choice(64, k, replace=False)))
    out = np.concatenate([base, src ^ noise])
    return out[rng.permutation(out.size)]


def timed(fn, *args, repeats: int = 1, **kw) -> tuple[float, object]:
    """(median wall seconds, result) of `repeats` calls."""
    wall, _, result = timed_cpu(fn, *args, repeats=repeats, **kw)
    return wall, result


def timed_cpu(fn, *args, repeats: int = 1, **kw) -> tuple[float, float, object]:
    """(median wall s, median CPU s of this process, result). CPU time is what the growth
    column uses: on a machine shared with other jobs, wall time also counts waiting for a core."""
    walls, cpus, result = [], [], None
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        result = fn(*args, **kw)
        walls.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
    return statistics.median(walls), statistics.median(cpus), result


def _vm_hwm() -> int:
    """Peak RSS of this process in bytes (VmHWM; unlike ru_maxrss it is not carried over
    from the parent across fork/exec, which would report the parent's peak)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def _child_peak(n: int, d: int, bands: int | None, queue) -> None:
    import psutil

    h = planted_hashes(n, d)
    before = psutil.Process().memory_info().rss
    t0 = time.perf_counter()
    mih.group_labels(h, d, bands)
    wall = time.perf_counter() - t0
    queue.put((wall, before, _vm_hwm()))


def peak_rss(n: int, d: int, bands: int | None) -> tuple[float, int, int]:
    """(wall s, RSS before grouping, peak RSS) of grouping n hashes in a fresh process."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child_peak, args=(n, d, bands, queue))
    proc.start()
    result = queue.get()
    proc.join()
    return result


def decide_pass(n: int, d: int) -> tuple[float, int]:
    """Wall time of the step's whole driver pass on n synthetic hash rows (hosts, sha256,
    aesthetic, sizes, 1% undecodable), as `curate neardup` runs it after hashing."""
    import pyarrow as pa

    from curate.images import grouping, hashing, outputs

    rng = np.random.default_rng(2)
    ph = planted_hashes(n, d)
    error = np.where(rng.random(n) < 0.01, "undecodable image: test", None)
    table = pa.table({
        "key": [f"{i:09d}" for i in range(n)], "shard": [f"{i // 10_000:05d}.tar" for i in range(n)],
        "row": np.arange(n) % 10_000, "sha256": [h.to_bytes(8, "big") * 4 for h in ph.tolist()],
        "phash": pa.array(ph, pa.uint64()), "host": [f"h{i % 5000}.com" for i in range(n)],
        "aesthetic": rng.normal(5, 1, n), "width": rng.integers(64, 2048, n), "height": rng.integers(64, 2048, n),
        "error": pa.array(error.tolist(), pa.string()),
    }, schema=hashing.HASH_SCHEMA)
    t0 = time.perf_counter()
    dec = grouping.decide(table, d, 20)
    outputs.keep_table(table, dec), outputs.groups_table(table, dec)
    return time.perf_counter() - t0, n


def exactness(n: int, d: int) -> list[str]:
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    h = planted_hashes(n, d, seed=1)
    uniq = np.unique(h)
    t_bf, (bi, bj) = timed(mih.brute_force_pairs, uniq, d)
    truth = set(zip(bi.tolist(), bj.tolist()))
    lines = [f"exactness on {n:,} hashes ({uniq.size:,} distinct), d={d}: brute force {len(truth):,} pairs in {t_bf:.2f} s"]
    for name, bands in (("auto", None), ("classic d+1", d + 1)):
        t, (i, j) = timed(mih.distinct_pairs, uniq, d, bands=bands)
        found = set(zip(i.tolist(), j.tolist()))
        hit = len(found & truth)
        lines.append(f"  {name:12s} {len(found):,} pairs in {t:.3f} s  recall {100 * hit / max(1, len(truth)):.2f}%  "
                     f"precision {100 * hit / max(1, len(found)):.2f}%  ({t_bf / t:.0f}x faster than brute force)")
    labels = mih.group_labels(h, d)
    # Reference groups: brute-force edges over all n (exact repeats included), scipy components.
    inv = np.unique(h, return_inverse=True)[1]
    rows = np.concatenate([bi, np.arange(h.size) * 0 + inv[np.arange(h.size)]])
    cols = np.concatenate([bj, np.arange(h.size) + uniq.size])
    graph = coo_matrix((np.ones(rows.size), (rows, cols)), shape=(uniq.size + h.size,) * 2)
    ref = connected_components(graph, directed=False)[1][uniq.size:]
    same = len(set(zip(labels.tolist(), ref.tolist()))) == len(set(ref.tolist())) == len(set(labels.tolist()))
    lines.append(f"  groups: {len(set(labels.tolist())):,}, identical to brute force + scipy components: {same}")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", action="store_true", help="n up to 100k, 5k exactness subset (a quick check)")
    ap.add_argument("--distance", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    d = args.distance
    sizes = [12_500, 25_000, 50_000, 100_000] if args.small else [125_000, 250_000, 500_000, 1_000_000]
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, python {platform.python_version()}, numpy {np.__version__}")
    print(f"{'n':>10} {'bands':>6} {'auto s':>8} {'auto cpu s':>10} {'cpu/(n log n)':>13} {'classic s':>10} "
          f"{'classic cpu s':>13} {'classic/auto cpu':>16} {'groups':>9}")
    first = None
    for n in sizes:
        h = planted_hashes(n, d)
        t_auto, c_auto, labels = timed_cpu(mih.group_labels, h, d, repeats=args.repeats)
        t_classic, c_classic, labels_c = timed_cpu(mih.group_labels, h, d, d + 1, repeats=1 if n >= 500_000 else args.repeats)
        assert np.array_equal(labels, labels_c), "classic and automatic bands disagree"
        per = c_auto / (n * math.log2(n))
        first = first or per
        print(f"{n:>10,} {mih.choose_bands(n, d):>6} {t_auto:>8.2f} {c_auto:>10.2f} {per / first:>13.2f} {t_classic:>10.2f} "
              f"{c_classic:>13.2f} {c_classic / c_auto:>16.1f} {np.unique(labels).size:>9,}")
    for name, bands in (("auto", None), ("classic d+1", d + 1)):
        wall, before, peak = peak_rss(sizes[-1], d, bands)
        print(f"peak RSS grouping {sizes[-1]:,} hashes, {name} (fresh process): {peak / 2**20:.0f} MiB "
              f"(before grouping {before / 2**20:.0f} MiB), wall {wall:.2f} s")
    t_decide, n_rows = decide_pass(sizes[-1], d)
    print(f"neardup grouping pass (grouping.decide + keep/groups tables) on {n_rows:,} hash rows: {t_decide:.2f} s")
    for line in exactness(5_000 if args.small else 20_000, d):
        print(line)


if __name__ == "__main__":
    main()
