"""Near-dup pass 2, over all shards: the ledger outcome of every hashed image.

Placeholders first (a pHash seen under >= N distinct URL hosts is an "image not available"
picture: every copy is `filtered`), then exact duplicates by sha256, then pHash neighbours
within Hamming distance d found by multi-index hashing (`curate.images.mih`), joined into
connected components. One image per component is kept: highest aesthetic, then largest
original w*h, then smallest key. Pure numpy/pyarrow over the hash table's columns.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from curate.images import mih

@dataclass
class Decisions:
    """Per-row outcome of grouping, aligned with the hash table's rows."""

    state: np.ndarray  # object: kept / filtered / duplicate / failed
    reason: np.ndarray  # object or None
    value: np.ndarray  # object or None
    ref: np.ndarray  # object: kept key for duplicates
    group: np.ndarray  # int64: component root row (-1 for failed / placeholder rows)
    distance: np.ndarray  # int64: Hamming distance to the kept image of the group (-1: none)


def placeholder_hashes(phash: np.ndarray, host_code: np.ndarray, threshold: int) -> dict[int, int]:
    """pHash -> distinct host count, for hashes seen under >= `threshold` distinct hosts.
    `host_code`: an integer per distinct host (see `codes`), -1 where there is none."""
    if threshold <= 0 or phash.size == 0:
        return {}
    has_host = host_code >= 0
    if not has_host.any():
        return {}
    host_code = host_code[has_host].astype(np.int64)
    values, hash_code = np.unique(phash[has_host], return_inverse=True)
    # One int64 per (hash, host) pair, so distinct pairs are a plain integer unique.
    pair = np.unique(hash_code.astype(np.int64) * (int(host_code.max()) + 1) + host_code)
    counts = np.bincount(pair // (int(host_code.max()) + 1), minlength=values.size)
    hit = counts >= threshold
    return dict(zip(values[hit].tolist(), counts[hit].tolist()))


def components(sha: np.ndarray, phash: np.ndarray, d: int, bands: int | None) -> np.ndarray:
    """Group root of each row: equal sha256 first (collapsed; a digest's pHash is that of its
    first row), then pHash within d (MIH). The root is the component's first row, whatever
    else the table holds. `sha` may be the digests or any integer codes of them."""
    _, first, inverse = np.unique(sha, return_index=True, return_inverse=True)
    by_row = np.argsort(first)  # digests in the order of their first row
    rank = np.empty_like(by_row)
    rank[by_row] = np.arange(by_row.size)
    rep_labels = mih.group_labels(phash[first[by_row]], d, bands)  # smallest member = earliest first row
    return first[by_row][rep_labels][rank[inverse]]


def kept_rows(group: np.ndarray, aesthetic: np.ndarray, area: np.ndarray, key_rank: np.ndarray) -> np.ndarray:
    """Row index of the kept image of each row's group: highest aesthetic (missing = lowest),
    then largest w*h, then smallest key. Deterministic whatever the input order."""
    order = np.lexsort((key_rank, -area, -np.nan_to_num(aesthetic, nan=-np.inf), group))
    first_of_group = np.ones(order.size, dtype=bool)
    first_of_group[1:] = group[order][1:] != group[order][:-1]
    winners = order[first_of_group]  # one per group, in group order
    # Map every row to its group's winner: groups in `order` are sorted, so search them.
    return winners[np.searchsorted(group[winners], group)]


def codes(column: pa.ChunkedArray) -> np.ndarray:
    """Integer code per row, equal exactly when the strings are equal (arrow hash encoding);
    -1 for null. No Python string per row is made (memory: the driver holds every row)."""
    indices = column.combine_chunks().dictionary_encode().indices
    return indices.fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64)


def key_ranks(table: pa.Table) -> np.ndarray:
    """Rank of each row by (key, shard): the keep rule's last tie-break."""
    import pyarrow.compute as pc

    order = pc.sort_indices(table.select(["key", "shard"]), sort_keys=[("key", "ascending"), ("shard", "ascending")])
    ranks = np.empty(table.num_rows, dtype=np.int64)
    ranks[order.to_numpy()] = np.arange(table.num_rows)
    return ranks


def decide(table: pa.Table, distance: int, placeholder_hosts: int, bands: int | None = None) -> Decisions:
    """Ledger outcome of every hash row (see module doc for the order of the rules)."""
    n = table.num_rows
    phash = table["phash"].fill_null(0).to_numpy().astype(np.uint64)
    out = Decisions(np.full(n, "kept", object), np.full(n, None, object), np.full(n, None, object),
                    np.full(n, None, object), np.full(n, -1, np.int64), np.full(n, -1, np.int64))
    failed = table["error"].is_valid().to_numpy(zero_copy_only=False)
    out.state[failed] = "failed"
    out.reason[failed] = table["error"].filter(pa.array(failed)).to_pylist()
    ok = np.flatnonzero(~failed)
    placeholders = placeholder_hashes(phash[ok], codes(table["host"])[ok], placeholder_hosts)
    is_ph = np.isin(phash[ok], np.array(list(placeholders), dtype=np.uint64))
    ph_rows = ok[is_ph]
    out.state[ph_rows], out.reason[ph_rows] = "filtered", "placeholder"
    out.value[ph_rows] = [f"{placeholders[int(h)]} hosts" for h in phash[ph_rows]]
    _group_and_keep(table, ok[~is_ph], phash, distance, bands, out)
    return out


def _group_and_keep(table: pa.Table, rows: np.ndarray, phash: np.ndarray, distance: int, bands: int | None,
                    out: Decisions) -> None:
    """Fill `out` for the rows that take part in grouping (decoded, not placeholders)."""
    if rows.size == 0:
        return
    sha_code = codes(table["sha256"])  # equal digests <-> equal codes (hashing, not sorting strings)
    group = rows[components(sha_code[rows], phash[rows], distance, bands)]
    aesthetic = table["aesthetic"].to_numpy(zero_copy_only=False).astype(np.float64)[rows]
    width = table["width"].fill_null(0).to_numpy().astype(np.int64)[rows]
    height = table["height"].fill_null(0).to_numpy().astype(np.int64)[rows]
    kept = rows[kept_rows(group, aesthetic, width * height, key_ranks(table)[rows])]
    out.group[rows] = group
    out.distance[rows] = mih.hamming(phash[rows], phash[kept]).astype(np.int64)
    dup = rows[kept != rows]
    dup_kept = kept[kept != rows]
    out.state[dup] = "duplicate"
    out.ref[dup] = table["key"].take(pa.array(dup_kept)).to_pylist()
    out.reason[dup] = np.where(sha_code[dup] == sha_code[dup_kept], "sha256", "phash")
    out.value[dup] = [f"distance {d}" for d in out.distance[dup]]


