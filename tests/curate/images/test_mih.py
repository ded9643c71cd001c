"""Multi-index hashing and union-find against brute force and scipy."""
from __future__ import annotations

import numpy as np
import pytest
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from curate.images import mih


def planted(n: int, d: int, seed: int = 0) -> np.ndarray:
    """n random hashes; a third of them are copies of others with 0..d+1 bits flipped."""
    rng = np.random.default_rng(seed)
    h = rng.integers(0, np.iinfo(np.uint64).max, size=n, dtype=np.uint64, endpoint=True)
    for t in range(n // 3):
        src = rng.integers(0, n - n // 3)
        flips = rng.choice(64, size=rng.integers(0, d + 2), replace=False)
        h[n - 1 - t] = h[src] ^ np.uint64(sum(1 << int(b) for b in flips))
    return h


def as_set(i: np.ndarray, j: np.ndarray) -> set[tuple[int, int]]:
    return set(zip(i.tolist(), j.tolist()))


def test_hamming_counts_differing_bits() -> None:
    a = np.array([0, 0b1011, 2**64 - 1], dtype=np.uint64)
    b = np.array([0, 0b0001, 0], dtype=np.uint64)
    assert mih.hamming(a, b).tolist() == [0, 2, 64]


def test_band_masks_partition_the_bits() -> None:
    for bands in (1, 5, 7, 64):
        masks = mih.band_masks(64, bands)
        assert len(masks) == bands
        assert sum(bin(m).count("1") for m in masks) == 64
        assert np.bitwise_or.reduce(np.array(masks, dtype=object)) == 2**64 - 1
        sizes = [bin(m).count("1") for m in masks]
        assert max(sizes) - min(sizes) <= 1


def test_table_masks_count_is_binomial() -> None:
    assert len(mih.table_masks(64, 5, 4)) == 5  # classic MIH: d+1 single bands
    assert len(mih.table_masks(64, 6, 4)) == 15
    with pytest.raises(ValueError, match="d\\+1"):
        mih.table_masks(64, 4, 4)


def test_pairs_in_runs_lists_every_pair_once() -> None:
    keys = np.array([1, 1, 1, 2, 3, 3, 4, 4, 4, 4])
    starts, ends = mih.run_bounds(keys)
    i, j = mih.pairs_in_runs(starts, ends)
    expected = {(a, b) for a in range(10) for b in range(a + 1, 10) if keys[a] == keys[b]}
    assert as_set(i, j) == expected
    assert len(i) == len(expected)


def test_compact_bits_gathers_masked_bits() -> None:
    v = np.array([0b1010_1100], dtype=np.uint64)
    assert mih.compact_bits(v, 0b1111_0000).tolist() == [0b1010]
    assert mih.compact_bits(v, 0b1000_0100).tolist() == [0b11]


@pytest.mark.parametrize("d", [0, 1, 4, 6])
@pytest.mark.parametrize("bands", [None, "classic", "wide"])
def test_distinct_pairs_equal_brute_force(d: int, bands: str | None) -> None:
    h = np.unique(planted(3000, d, seed=d))
    b = {None: None, "classic": d + 1, "wide": d + 3}[bands]
    got = mih.distinct_pairs(h, d, bands=b)
    want = mih.brute_force_pairs(h, d)
    assert as_set(*got) == as_set(*want)
    assert len(got[0]) == len(want[0]) > (0 if d else -1)


def test_giant_runs_are_solved_by_recursion_not_pairs(monkeypatch) -> None:
    # 2048 distinct hashes that all share their high 52 bits: every band-key of the high
    # bits is one giant run. Recursion must find exactly the brute-force pairs.
    low = np.arange(2048, dtype=np.uint64)
    h = (np.uint64(0xABCDE) << np.uint64(44)) | (low * np.uint64(0x9E3779B1) & np.uint64(0xFFF))
    h = np.unique(h)
    calls = []
    real = mih.compact_bits
    monkeypatch.setattr(mih, "compact_bits", lambda v, m: calls.append(v.size) or real(v, m))
    got = mih.distinct_pairs(h, 2, max_run=64)
    assert as_set(*got) == as_set(*mih.brute_force_pairs(h, 2))
    assert calls and max(calls) > 64  # the giant runs went to recursion


def test_union_find_matches_scipy_components() -> None:
    rng = np.random.default_rng(3)
    n = 5000
    i, j = rng.integers(0, n, 4000), rng.integers(0, n, 4000)
    roots = mih.union_find(n, i, j)
    _, ref = connected_components(coo_matrix((np.ones(i.size), (i, j)), shape=(n, n)), directed=False)
    # Same partition: a bijection between our roots and scipy's labels.
    assert len(set(zip(roots.tolist(), ref.tolist()))) == len(set(ref.tolist())) == len(set(roots.tolist()))
    assert (roots <= np.arange(n)).all()  # the root is the smallest member
    assert (roots[roots] == roots).all()


def test_group_labels_joins_transitively_and_collapses_repeats() -> None:
    a = 0
    b = a ^ 0b1111  # distance 4 from a
    c = b ^ (0b1111 << 8)  # distance 4 from b, 8 from a
    far = 2**63 - 1
    h = np.array([far, c, a, a, b, far], dtype=np.uint64)
    labels = mih.group_labels(h, 4)
    assert labels.tolist() == [0, 1, 1, 1, 1, 0]


def test_choose_bands_grows_keys_with_n() -> None:
    assert mih.choose_bands(1000, 4) == 5
    assert mih.choose_bands(10**6, 4) > 5
    assert all(mih.choose_bands(n, d) >= d + 1 for n in (10, 10**9) for d in (0, 3, 8))


def test_runs_are_paired_in_bounded_chunks() -> None:
    lengths = np.array([2, 5, 1, 7, 3, 3, 40])
    ends = np.cumsum(lengths)
    starts = ends - lengths
    chunks = list(mih._chunks_of_runs(starts, ends, max_pairs=10))
    assert len(chunks) > 3
    got = set()
    for s, e in chunks:
        pairs = len(mih.pairs_in_runs(s, e)[0])
        largest = int(((e - s) * (e - s - 1) // 2).max())
        assert pairs <= 10 + largest  # the bound, overshot by at most one run
        got |= as_set(*mih.pairs_in_runs(s, e))
    assert got == as_set(*mih.pairs_in_runs(starts, ends))
