"""Near-duplicate grouping of 64-bit hashes: multi-index hashing + union-find, pure numpy.

Two hashes are near-duplicates when their Hamming distance is <= d. Comparing all pairs is
O(n^2); multi-index hashing (MIH) avoids it with the pigeonhole principle:

  * split the hash bits into B >= d+1 contiguous bands;
  * two hashes within distance d differ in at most d bands, so they agree exactly on at
    least B-d bands, i.e. on every band of at least one of the C(B, d) subsets of B-d bands;
  * for each such subset ("table") sort the hashes by their bits in those bands and pair
    only the hashes inside runs of equal values; verify each candidate with a popcount.

B = d+1 is classic MIH (d+1 tables, one band each). Its bands are only 64/(d+1) bits wide
(13 bits at d=4), so random hashes collide n^2/2^14 times per table: quadratic. A larger B
gives wider keys (B-d bands) at the price of more tables; `choose_bands` picks the cheapest
B for n. Results are identical for every B (the test and the benchmark check against brute
force); only the speed differs.

Guards: exact repeats are collapsed before pairing (they would form one giant run), and a
run of more than `max_run` distinct hashes that share a key is solved recursively on the
bits they do not share, so a skewed distribution never becomes an O(k^2) candidate list.
"""
from __future__ import annotations

import functools
import itertools
import math
import operator

import numpy as np

U64 = np.uint64
HASH_BITS = 64
MAX_RUN = 2048  # runs of equal keys longer than this are split by recursion, not paired
MAX_CANDIDATES = 4_000_000  # candidate pairs generated at once (~200 MB of index arrays)


def hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Element-wise Hamming distance of two uint64 arrays -> uint8 array."""
    return np.bitwise_count(np.bitwise_xor(a, b))


def band_masks(width: int, bands: int) -> list[int]:
    """Masks of `bands` contiguous bands covering the low `width` bits (sizes differ by <= 1)."""
    if not 1 <= bands <= width:
        raise ValueError(f"bands must be in 1..{width}, got {bands}")
    sizes = [width // bands + (1 if i < width % bands else 0) for i in range(bands)]
    masks, shift = [], 0
    for size in sizes:
        masks.append(((1 << size) - 1) << shift)
        shift += size
    return masks


def table_masks(width: int, bands: int, d: int) -> list[int]:
    """One key mask per table: the OR of each subset of `bands - d` bands (C(bands, d) tables)."""
    if bands < d + 1:
        raise ValueError(f"bands must be >= d+1 = {d + 1} for the pigeonhole bound, got {bands}")
    masks = band_masks(width, bands)
    return [functools.reduce(operator.or_, subset) for subset in itertools.combinations(masks, bands - d)]


def expected_cost(n: int, d: int, bands: int, width: int = HASH_BITS) -> float:
    """Rough cost (ns) of MIH with `bands` on n uniform random hashes: sorts + candidate checks.

    Per table: a sort (~3 ns * n log2 n) and ~40 ns per candidate pair; a key of k bits
    gives ~n^2 / 2^(k+1) candidate pairs for uniform hashes."""
    tables = math.comb(bands, d)
    key_bits = sum(sorted(width // bands + (1 if i < width % bands else 0) for i in range(bands))[: bands - d])
    pairs = n * n / 2.0 ** (key_bits + 1)
    return tables * (3.0 * n * max(1.0, math.log2(max(n, 2))) + 40.0 * pairs)


def choose_bands(n: int, d: int, width: int = HASH_BITS) -> int:
    """The band count B in [d+1, min(width, d+8)] with the least `expected_cost` for n hashes."""
    options = range(d + 1, min(width, d + 8) + 1)
    return min(options, key=lambda b: (expected_cost(n, d, b, width), b))


# ---------------------------------------------------------------- MIH split across tasks
#
# A table's key is the OR of B-d bands, so two hashes with equal keys in table t agree on every
# band of t. Assign each table to one of the first d+1 bands ("index bands"; every table holds
# at least one: it leaves out only d of the B bands) and cut the hashes by their value in each
# index band: a task given "index band s, values in range r" sees every pair that could match
# in the tables of s. Each hash is sent to d+1 tasks (one per index band), whatever B is.


def assign_tables(width: int, bands: int, d: int) -> list[list[int]]:
    """Per index band s (0..d): the key masks of the tables assigned to it. Each of the
    C(bands, d) tables goes to the index band it contains that has the fewest tables so far."""
    masks = band_masks(width, bands)
    out: list[list[int]] = [[] for _ in range(d + 1)]
    for subset in itertools.combinations(range(bands), bands - d):
        home = min((b for b in subset if b <= d), key=lambda b: (len(out[b]), b))
        out[home].append(functools.reduce(operator.or_, (masks[b] for b in subset)))
    return out


def band_part(h: np.ndarray, band_mask: int, parts: int) -> np.ndarray:
    """Which of `parts` ranges (a power of 2, <= 2**band width) each hash's value in one band
    falls into: its top log2(parts) bits. Equal band values always share a range."""
    width = bin(band_mask).count("1")
    bits = parts.bit_length() - 1
    if parts != 1 << bits or bits > width:
        raise ValueError(f"parts must be a power of 2 up to 2**{width}, got {parts}")
    shift = (band_mask & -band_mask).bit_length() - 1 + width - bits
    return ((np.asarray(h, dtype=U64) >> U64(shift)) & U64(parts - 1)).astype(np.int64)


def partition_pairs(u: np.ndarray, d: int, key_masks: list[int], max_run: int = MAX_RUN) -> tuple[np.ndarray, np.ndarray]:
    """Verified pairs (i, j), i < j, of DISTINCT hashes `u` in the tables `key_masks` (one
    task's share: its index band's tables, over the hashes of its range)."""
    found = [table_pairs(u, d, mask, HASH_BITS, max_run) for mask in key_masks]
    if not found:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return _dedupe(np.concatenate([f[0] for f in found]), np.concatenate([f[1] for f in found]), max(1, u.size))


def run_bounds(sorted_keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Start and end (exclusive) of each run of equal values in a sorted array."""
    if sorted_keys.size == 0:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty
    change = np.flatnonzero(sorted_keys[1:] != sorted_keys[:-1]) + 1
    starts = np.concatenate(([0], change)).astype(np.int64)
    ends = np.concatenate((change, [sorted_keys.size])).astype(np.int64)
    return starts, ends


def pairs_in_runs(starts: np.ndarray, ends: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every (i, j), i < j, of positions inside the same run, without a Python loop over runs.

    Loops over the offset o = j - i instead; at each offset only positions whose run still
    has >= o elements after them stay active, so the work is the pair count plus the runs."""
    lengths = ends - starts
    keep = lengths > 1
    starts, ends = starts[keep], ends[keep]
    lengths = ends - starts
    # Every position of every run: run start + offset inside the run.
    run_of = np.repeat(np.arange(starts.size), lengths)
    pos = starts[run_of] + (np.arange(run_of.size) - np.repeat(np.cumsum(lengths) - lengths, lengths))
    # Elements remaining after each position in its run: (run end - 1) - position.
    remaining = ends[run_of] - 1 - pos
    out_i, out_j = [], []
    offset = 1
    while pos.size:
        alive = remaining >= offset
        pos, remaining = pos[alive], remaining[alive]
        out_i.append(pos)
        out_j.append(pos + offset)
        offset += 1
    if not out_i:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.concatenate(out_i), np.concatenate(out_j)


def compact_bits(values: np.ndarray, mask: int) -> np.ndarray:
    """Gather the bits of `values` selected by `mask` into the low bits (a vectorised pext)."""
    out = np.zeros(values.shape, dtype=U64)
    dest = 0
    for bit in range(HASH_BITS):
        if mask >> bit & 1:
            out |= ((values >> U64(bit)) & U64(1)) << U64(dest)
            dest += 1
    return out


def all_pairs(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Every (i, j), i < j, for i, j < n."""
    i, j = np.triu_indices(n, k=1)
    return i.astype(np.int64), j.astype(np.int64)


def distinct_pairs(
    h: np.ndarray, d: int, width: int = HASH_BITS, bands: int | None = None, max_run: int = MAX_RUN
) -> tuple[np.ndarray, np.ndarray]:
    """All (i, j), i < j, with hamming(h[i], h[j]) <= d, for DISTINCT hashes in the low `width` bits.

    Returns int64 index arrays, each pair once, sorted by (i, j)."""
    n = h.size
    if n < 2:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    if width <= d or n <= 64:
        # Every pair is a candidate anyway (width <= d) or the input is tiny: check all pairs.
        i, j = all_pairs(n)
        return _verified(h, i, j, d)
    bands = bands or choose_bands(n, d, width)
    found_i, found_j = [], []
    for key_mask in table_masks(width, bands, d):
        i, j = table_pairs(h, d, key_mask, width, max_run)
        found_i.append(i)
        found_j.append(j)
    return _dedupe(np.concatenate(found_i), np.concatenate(found_j), n)


def table_pairs(h: np.ndarray, d: int, key_mask: int, width: int, max_run: int) -> tuple[np.ndarray, np.ndarray]:
    """Verified pairs of one table: sort by key, pair within runs, recurse into giant runs."""
    keys = h & U64(key_mask)
    order = np.argsort(keys)  # stability not needed: pairs are deduplicated and sorted after
    starts, ends = run_bounds(keys[order])
    giant = (ends - starts) > max_run
    parts_i, parts_j = [], []
    for s, e in _chunks_of_runs(starts[~giant], ends[~giant]):
        a, b = pairs_in_runs(s, e)
        i, j = _verified(h, order[a], order[b], d)
        parts_i.append(i)
        parts_j.append(j)
    free_mask = ((1 << width) - 1) & ~key_mask
    free_width = bin(free_mask).count("1")
    for s, e in zip(starts[giant], ends[giant]):
        members = order[s:e]
        # Members share the key bits, so their distance lives in the free bits only.
        si, sj = distinct_pairs(compact_bits(h[members], free_mask), d, free_width, None, max_run)
        parts_i.append(members[si])
        parts_j.append(members[sj])
    if not parts_i:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.concatenate(parts_i), np.concatenate(parts_j)


def _chunks_of_runs(starts: np.ndarray, ends: np.ndarray, max_pairs: int = MAX_CANDIDATES):
    """Consecutive slices of the runs, each holding at most max_pairs candidate pairs plus one
    run's pairs, so candidate arrays stay bounded whatever the band choice."""
    lengths = ends - starts
    cum = np.cumsum(lengths * (lengths - 1) // 2)
    chunk_of = cum // max_pairs
    bounds = np.flatnonzero(np.diff(chunk_of)) + 1
    for lo, hi in zip(np.r_[0, bounds], np.r_[bounds, starts.size]):
        yield starts[lo:hi], ends[lo:hi]


def _verified(h: np.ndarray, i: np.ndarray, j: np.ndarray, d: int) -> tuple[np.ndarray, np.ndarray]:
    ok = hamming(h[i], h[j]) <= d
    return i[ok], j[ok]


def _dedupe(i: np.ndarray, j: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Order each pair (min, max), drop repeats found by several tables, sort."""
    lo, hi = np.minimum(i, j).astype(np.int64), np.maximum(i, j).astype(np.int64)
    code = np.unique(lo * n + hi)
    return code // n, code % n


def union_find(n: int, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    """Connected components of the graph with edges (i, j): each node's root = the smallest
    node of its component. Vectorised hook-and-compress union-find (a few rounds of numpy)."""
    parent = np.arange(n, dtype=np.int64)
    i, j = np.asarray(i, np.int64), np.asarray(j, np.int64)
    while i.size:
        ri, rj = parent[i], parent[j]
        differ = ri != rj
        if not differ.any():
            break
        i, j, ri, rj = i[differ], j[differ], ri[differ], rj[differ]
        # Hook the larger root under the smaller one; minimum.at keeps the smallest offer.
        np.minimum.at(parent, np.maximum(ri, rj), np.minimum(ri, rj))
        parent = _compress(parent)
    return parent


def _compress(parent: np.ndarray) -> np.ndarray:
    """Pointer jumping until every node points at its root."""
    while True:
        grand = parent[parent]
        if np.array_equal(grand, parent):
            return parent
        parent = grand


def group_labels(h: np.ndarray, d: int, bands: int | None = None) -> np.ndarray:
    """Component label of each hash (the smallest index of its group) under "distance <= d".

    Equal hashes are collapsed first (distance 0, joined without pairing them)."""
    h = np.asarray(h, dtype=U64)
    uniq, first, inverse = np.unique(h, return_index=True, return_inverse=True)
    i, j = distinct_pairs(uniq, d, HASH_BITS, bands)
    roots = union_find(uniq.size, i, j)
    # A component's label: the smallest original index among its members.
    label_of_root = np.full(uniq.size, np.iinfo(np.int64).max, dtype=np.int64)
    np.minimum.at(label_of_root, roots, first)
    return label_of_root[roots][inverse]


def brute_force_pairs(h: np.ndarray, d: int, chunk: int = 2048) -> tuple[np.ndarray, np.ndarray]:
    """Reference: all (i, j), i < j, hamming <= d, by comparing every pair (O(n^2); tests/bench)."""
    h = np.asarray(h, dtype=U64)
    out_i, out_j = [], []
    for start in range(0, h.size, chunk):
        block = h[start : start + chunk]
        dist = hamming(block[:, None], h[None, :])  # (chunk, n)
        bi, bj = np.nonzero(dist <= d)
        bi = bi + start
        keep = bi < bj
        out_i.append(bi[keep])
        out_j.append(bj[keep])
    if not out_i:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.concatenate(out_i).astype(np.int64), np.concatenate(out_j).astype(np.int64)
