"""The tasks of near-dup grouping at scale: each reads and writes files, none sees all images.

Every hash row has a global id (`gid`, int64): its position in the concatenation of the
shards' hash parts, in shard order. The rules are those of `curate.images.grouping` (its
`decide` is the single-pass reference these tasks must equal): failed rows; placeholders (a
pHash under >= N distinct hosts); then components of "same sha256" and "pHash within d"
(between the pHashes of each sha256's first row), one row kept per component by the keep
rule (aesthetic, then w*h, then key, shard and position). The tasks, in order (`group_run`):

    scatter       per block of shards: ok rows -> buckets by pHash (placeholders) and by sha256
    placeholders  per pHash bucket: distinct hosts per pHash -> the placeholder pHashes
    shas          per sha256 bucket: drop placeholders; per sha256: first row (`rep`), size and
                  best row by the keep rule; each rep's pHash -> d+1 MIH partitions
    pairs         per MIH partition (index band, value range): candidate pairs in its tables,
                  verified (Hamming <= d) in the task -> edges between reps
    components    one task: union-find over the edges (int64 ids; only reps with an edge),
                  each component's size and best row
    resolve       per sha256 bucket: every row's component, kept row and distance -> the
                  duplicates by ledger block, the members of groups >= 2 by label range
    ledgers       per block of shards: one ledger part per shard; the block's keep rows
    groups        per label range: _groups rows
    finish        one task: keep.parquet and _groups.parquet, streamed from the parts in order
Files go through `curate.images.buckets` (one file per task, a row group per bucket). Each
task returns its counts and its own peak RSS for its completion marker.
"""
from __future__ import annotations

import functools
import resource
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from core import atomic, keeplist, ledger, storage
from curate.images import buckets, mih
from curate.images.outputs import STEP_NAME

SHA = pa.binary(32)
SHA_SCHEMA = pa.schema([("sha", SHA), ("gid", pa.int64()), ("phash", pa.uint64()), ("aesthetic", pa.float64()),
                        ("area", pa.int64()), ("key", pa.string()), ("shard", pa.int32())])
HOST_SCHEMA = pa.schema([("phash", pa.uint64()), ("host", pa.string())])
PLACEHOLDER_SCHEMA = pa.schema([("phash", pa.uint64()), ("hosts", pa.int64())])
REP_SCHEMA = pa.schema([("rep", pa.int64()), ("phash", pa.uint64())])
# One row per sha256 group: its first row, size and best row (the keep rule's fields).
GROUP_SCHEMA = pa.schema([("rep", pa.int64()), ("size", pa.int64()), ("win", pa.int64()), ("win_aesthetic", pa.float64()),
                          ("win_area", pa.int64()), ("win_key", pa.string()), ("win_shard", pa.int32()),
                          ("win_phash", pa.uint64())])
ROW_SCHEMA = pa.schema([("gid", pa.int64()), ("rep", pa.int64()), ("phash", pa.uint64()), ("key", pa.string()),
                        ("shard", pa.int32())])
EDGE_SCHEMA = pa.schema([("a", pa.int64()), ("b", pa.int64())])
COMP_SCHEMA = pa.schema([("rep", pa.int64()), ("label", pa.int64()), ("size", pa.int64()), ("win", pa.int64()),
                         ("win_key", pa.string()), ("win_phash", pa.uint64()), ("win_rep", pa.int64())])
DUP_SCHEMA = pa.schema([("gid", pa.int64()), ("sha", pa.bool_()), ("distance", pa.int8()), ("ref", pa.string())])
MEMBER_SCHEMA = pa.schema([("label", pa.int64()), ("gid", pa.int64()), ("key", pa.string()), ("shard", pa.int32()),
                           ("distance", pa.int8()), ("dup", pa.bool_()), ("sha", pa.bool_())])
GROUPS_SCHEMA = pa.schema([("group_id", pa.int64()), ("kept_key", pa.string()), ("kept_shard", pa.string()),
                           ("size", pa.int64()), ("members", pa.list_(pa.string())),
                           ("member_shards", pa.list_(pa.string())), ("distances", pa.list_(pa.int8())),
                           ("reasons", pa.list_(pa.string()))])


@dataclass(frozen=True)
class Layout:
    """What every task knows about the job (sizes and names: nothing per image)."""

    root: str  # OUT/_grouping: every intermediate file of the job is below it
    rows: int  # hash rows in all; gids are 0..rows-1
    buckets: int  # pHash / sha256 buckets (placeholder, shas and resolve tasks)
    distance: int  # d: largest Hamming distance that joins two pHashes
    placeholder_hosts: int  # distinct hosts that make a pHash a placeholder (0: none)
    bands: int  # MIH band count B
    band_parts: int  # value ranges per index band (a power of 2): pairs tasks = (d+1) * band_parts
    tables: tuple[tuple[int, ...], ...]  # per index band 0..d: key masks of its MIH tables (mih.assign_tables)
    blocks: tuple[int, ...]  # first gid of each block of shards, then `rows`
    group_parts: int  # label ranges (groups tasks)

    def path(self, kind: str, index: int | None = None) -> str:
        name = f"{kind}.parquet" if index is None else f"{kind}/{index:05d}.parquet"
        return str(storage.path(self.root) / name)

    def block_of(self, gid: np.ndarray) -> np.ndarray:
        return np.searchsorted(np.asarray(self.blocks), gid, side="right") - 1

    def label_part(self, label: np.ndarray) -> np.ndarray:
        return (np.asarray(label, np.int64) * self.group_parts // max(1, self.rows)).astype(np.int64)

    def mih_part(self, index_band: int, phash: np.ndarray) -> np.ndarray:
        mask = mih.band_masks(mih.HASH_BITS, self.bands)[index_band]
        return index_band * self.band_parts + mih.band_part(phash, mask, self.band_parts)


def measured(fn: Callable[..., dict]) -> Callable[..., dict]:
    """A task that reports its own peak RSS (`peak_rss_mb`) in its marker. A Ray worker runs many
    tasks, so its high-water mark is reset first (Linux: /proc/self/clear_refs); where that is
    not allowed the figure is the worker's peak so far, an upper bound."""

    @functools.wraps(fn)
    def run(*args: Any) -> dict:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            pass
        return {**fn(*args), "peak_rss_mb": peak_rss_mb()}

    return run


def peak_rss_mb() -> float:
    """This process's peak RSS in MiB (VmHWM), or ru_maxrss where /proc is not there."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def sha_matrix(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """(n, 32) uint8 view of a binary(32) column without nulls."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if len(arr) == 0:
        return np.zeros((0, 32), np.uint8)
    data = np.frombuffer(arr.buffers()[1], np.uint8)
    return data[arr.offset * 32:(arr.offset + len(arr)) * 32].reshape(-1, 32)


def mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: spreads any bits of x over all 64 (bucket numbers from pHashes)."""
    x = np.asarray(x, np.uint64)
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def keep_order(table: pa.Table, group: str, aesthetic: str, area: str, key: str, shard: str, gid: str) -> np.ndarray:
    """Row order that puts each group's kept row first: group, then highest aesthetic (missing
    lowest), largest area, smallest key, shard and gid (grouping.kept_rows's rule)."""
    aes = table[aesthetic].to_numpy(zero_copy_only=False).astype(np.float64)
    order = pa.table({"g": table[group], "a": -np.nan_to_num(aes, nan=-np.inf), "r": pc.negate(table[area]),
                      "k": table[key], "s": table[shard], "i": table[gid]})
    keys = [(c, "ascending") for c in ("g", "a", "r", "k", "s", "i")]
    return pc.sort_indices(order, sort_keys=keys).to_numpy()


def first_of_runs(sorted_values: np.ndarray) -> np.ndarray:
    """Positions where a new value starts in a sorted array."""
    if sorted_values.size == 0:
        return np.zeros(0, np.int64)
    return np.flatnonzero(np.r_[True, sorted_values[1:] != sorted_values[:-1]])


def group_winners(t: pa.Table, group: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """Row of each sha256 group's kept image, in group order (by the keep rule, only where the
    group has several rows: most have one)."""
    sizes = np.diff(np.r_[starts, group.size])
    win = starts.copy()
    multi = np.flatnonzero(sizes[group] > 1)
    if multi.size:
        sub = t.take(pa.array(multi)).append_column("group", pa.array(group[multi], pa.int64()))
        best = keep_order(sub, "group", "aesthetic", "area", "key", "shard", "gid")
        firsts = best[first_of_runs(group[multi][best])]
        win[group[multi][firsts]] = multi[firsts]
    return win


def run_index(n: int, starts: np.ndarray) -> np.ndarray:
    """(n,) index of the run each position belongs to, given the runs' start positions."""
    flags = np.zeros(n, np.int64)
    flags[starts] = 1
    return np.cumsum(flags) - 1


# ---------------------------------------------------------------- scatter


@measured
def scatter(layout: Layout, block: int, parts: list[tuple[str, int, int]]) -> dict:
    """Unit: the ok rows of a block's hash parts ((path, shard index, first gid) each) into one
    pHash-bucketed file (hosts, for placeholders) and one sha256-bucketed file."""
    shas, hosts = [], []
    for path, shard, first in parts:
        t = storage.read_parquet(path, columns=["key", "sha256", "phash", "host", "aesthetic", "width", "height", "error"])
        ok = np.flatnonzero(t["error"].is_null().to_numpy(zero_copy_only=False))
        t = t.take(pa.array(ok))
        phash = t["phash"].fill_null(0).cast(pa.uint64())
        area = pc.multiply(t["width"].fill_null(0), t["height"].fill_null(0))
        shas.append(pa.table({"sha": t["sha256"], "gid": pa.array(first + ok, pa.int64()), "phash": phash,
                              "aesthetic": t["aesthetic"].cast(pa.float64()), "area": area.cast(pa.int64()),
                              "key": t["key"], "shard": pa.array(np.full(t.num_rows, shard, np.int32))}, schema=SHA_SCHEMA))
        hosts.append(pa.table({"phash": phash, "host": t["host"]}, schema=HOST_SCHEMA))
    sha = pa.concat_tables(shas) if shas else SHA_SCHEMA.empty_table()
    bucket = sha_matrix(sha["sha"])[:, :8].copy().view(np.uint64).ravel() % np.uint64(layout.buckets)
    buckets.write(layout.path("sha", block), sha, bucket)
    if layout.placeholder_hosts > 0:
        host = pa.concat_tables(hosts) if hosts else HOST_SCHEMA.empty_table()
        buckets.write(layout.path("host", block), host, mix64(host["phash"].to_numpy()) % np.uint64(layout.buckets))
    return {"rows": sha.num_rows}


# ---------------------------------------------------------------- placeholders


@measured
def placeholders(layout: Layout, bucket: int, host_files: list[str]) -> dict:
    """Unit: the pHashes of one bucket seen under >= placeholder_hosts distinct hosts."""
    t = buckets.read(host_files, bucket, schema=HOST_SCHEMA)
    counts = t.group_by("phash").aggregate([("host", "count_distinct")])  # nulls are not hosts
    hit = counts.filter(pc.greater_equal(counts["host_count_distinct"], layout.placeholder_hosts))
    out = pa.table({"phash": hit["phash"], "hosts": hit["host_count_distinct"]}, schema=PLACEHOLDER_SCHEMA)
    atomic.write_parquet(layout.path("placeholders", bucket), out)
    return {"placeholders": out.num_rows}


def load_placeholders(files: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(sorted placeholder pHashes, their host counts) from every placeholder part (a short list)."""
    parts = [storage.read_parquet(f) for f in files]
    t = pa.concat_tables(parts) if parts else PLACEHOLDER_SCHEMA.empty_table()
    ph = t["phash"].to_numpy()
    order = np.argsort(ph)
    return ph[order], t["hosts"].to_numpy()[order]


def lookup(sorted_keys: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(found, position) of each value in a sorted key array (position clipped where not found)."""
    if sorted_keys.size == 0:
        return np.zeros(values.shape, bool), np.zeros(values.shape, np.int64)
    pos = np.minimum(np.searchsorted(sorted_keys, values), sorted_keys.size - 1)
    return sorted_keys[pos] == values, pos


# ---------------------------------------------------------------- sha256 groups


@measured
def shas(layout: Layout, bucket: int, sha_files: list[str], placeholder_files: list[str]) -> dict:
    """Unit: one sha256 bucket without placeholders -> its sha256 groups (rep = first row, size,
    best row), its rows' reps, and each rep's pHash sent to the d+1 MIH partitions."""
    t = buckets.read(sha_files, bucket, schema=SHA_SCHEMA)
    ph, _ = load_placeholders(placeholder_files)
    t = t.filter(pa.array(~lookup(ph, t["phash"].to_numpy())[0]))
    t = t.take(pc.sort_indices(t, sort_keys=[("sha", "ascending"), ("gid", "ascending")]))
    words = sha_matrix(t["sha"]).view(np.uint64)  # (n, 4): equal digests <-> equal rows
    starts = np.flatnonzero(np.r_[True, (words[1:] != words[:-1]).any(axis=1)]) if t.num_rows else np.zeros(0, np.int64)
    group = run_index(t.num_rows, starts)  # (n,) group of each row
    gid, phash = t["gid"].to_numpy(), t["phash"].to_numpy()
    rep = gid[starts]
    win = group_winners(t, group, starts)
    by_rep = np.argsort(rep)
    groups = pa.table({"rep": rep, "size": np.diff(np.r_[starts, t.num_rows]), "win": gid[win],
                       "win_aesthetic": t["aesthetic"].take(pa.array(win)), "win_area": t["area"].take(pa.array(win)),
                       "win_key": t["key"].take(pa.array(win)), "win_shard": t["shard"].take(pa.array(win)),
                       "win_phash": phash[win]}, schema=GROUP_SCHEMA).take(pa.array(by_rep))
    atomic.write_parquet(layout.path("groups", bucket), groups)
    rows = pa.table({"gid": gid, "rep": rep[group], "phash": phash, "key": t["key"], "shard": t["shard"]}, schema=ROW_SCHEMA)
    atomic.write_parquet(layout.path("rows", bucket), rows)
    rep_phash = phash[starts]
    copies = pa.table({"rep": np.tile(rep, layout.distance + 1), "phash": np.tile(rep_phash, layout.distance + 1)},
                      schema=REP_SCHEMA)
    part = np.concatenate([layout.mih_part(s, rep_phash) for s in range(layout.distance + 1)])
    buckets.write(layout.path("reps", bucket), copies, part)
    return {"rows": t.num_rows, "sha_groups": int(rep.size)}


# ---------------------------------------------------------------- near pairs


@measured
def pairs(layout: Layout, part: int, rep_files: list[str]) -> dict:
    """Unit: one MIH partition (index band s, a range of its values): candidate pairs in the
    tables of s, verified in the task, as edges between reps; equal pHashes are joined too
    (by index band 0's partitions, which see each pHash once)."""
    s = part // layout.band_parts
    t = buckets.read(rep_files, part, schema=REP_SCHEMA)
    ph, rep = t["phash"].to_numpy(), t["rep"].to_numpy()
    order = np.lexsort((rep, ph))
    ph, rep = ph[order], rep[order]
    starts = first_of_runs(ph)
    u, first = ph[starts], rep[starts]  # distinct pHashes, the smallest rep of each
    edges_a, edges_b = [], []
    if s == 0:
        value = run_index(ph.size, starts)
        again = np.ones(ph.size, bool)
        again[starts] = False
        edges_a.append(first[value[again]])
        edges_b.append(rep[again])
    i, j = mih.partition_pairs(u, layout.distance, list(layout.tables[s]))
    edges_a.append(first[i])
    edges_b.append(first[j])
    a, b = np.concatenate(edges_a), np.concatenate(edges_b)
    lo, hi = np.minimum(a, b), np.maximum(a, b)
    keep = np.unique(np.stack([lo, hi], axis=1), axis=0) if lo.size else np.zeros((0, 2), np.int64)
    atomic.write_parquet(layout.path("edges", part), pa.table({"a": keep[:, 0], "b": keep[:, 1]}, schema=EDGE_SCHEMA))
    return {"hashes": int(u.size), "edges": int(keep.shape[0])}


# ---------------------------------------------------------------- components


@measured
def components(layout: Layout, edge_files: list[str], group_files: list[str]) -> dict:
    """Unit: union-find over every edge (int64 ids, only reps that have an edge), then each
    component's size and kept row; written per sha256 bucket of its reps."""
    edges = pa.concat_tables([storage.read_parquet(f) for f in edge_files]) if edge_files else EDGE_SCHEMA.empty_table()
    a, b = edges["a"].to_numpy(), edges["b"].to_numpy()
    n_edges = int(a.size)
    del edges
    nodes = np.unique(np.concatenate([a, b]))
    roots = mih.union_find(nodes.size, np.searchsorted(nodes, a), np.searchsorted(nodes, b))
    label = nodes[roots]  # the smallest gid of each node's component (nodes are sorted)
    del a, b, roots
    found = [_near_groups(storage.read_parquet(f), bucket, nodes, label) for bucket, f in enumerate(group_files)]
    g = pa.concat_tables(found) if found else _near_groups(GROUP_SCHEMA.empty_table(), 0, nodes, label)
    comp, inverse = np.unique(g["label"].to_numpy(), return_inverse=True)
    size = np.bincount(inverse, weights=g["size"].to_numpy(), minlength=comp.size).astype(np.int64)
    best = keep_order(g, "label", "win_aesthetic", "win_area", "win_key", "win_shard", "win")
    win = pa.array(best[first_of_runs(g["label"].to_numpy()[best])][inverse])  # per node: its component winner's row
    out = pa.table({"rep": g["rep"], "label": g["label"], "size": size[inverse], "win": g["win"].take(win),
                    "win_key": g["win_key"].take(win), "win_phash": g["win_phash"].take(win),
                    "win_rep": g["rep"].take(win)}, schema=COMP_SCHEMA)
    buckets.write(layout.path("comps"), out, g["bucket"].to_numpy())
    return {"nodes": int(nodes.size), "edges": n_edges, "components": int(comp.size)}


def _near_groups(g: pa.Table, bucket: int, nodes: np.ndarray, label: np.ndarray) -> pa.Table:
    """The sha256 groups of `g` whose rep has an edge, with their component label and bucket."""
    hit, pos = lookup(nodes, g["rep"].to_numpy())
    g = g.filter(pa.array(hit))
    return (g.append_column("label", pa.array(label[pos[hit]], pa.int64()))
             .append_column("bucket", pa.array(np.full(g.num_rows, bucket, np.int64))))


# ---------------------------------------------------------------- every row's outcome


@measured
def resolve(layout: Layout, bucket: int) -> dict:
    """Unit: the outcome of every row of one sha256 bucket: its component (a near one, else its
    sha256 group), the kept row, the distance to it. Duplicates go to their ledger block's
    bucket, members of groups of >= 2 rows to their label range's."""
    rows, groups = storage.read_parquet(layout.path("rows", bucket)), storage.read_parquet(layout.path("groups", bucket))
    comps = buckets.read([layout.path("comps")], bucket, schema=COMP_SCHEMA)
    comps = comps.take(pc.sort_indices(comps["rep"]))
    rep, gid, phash = rows["rep"].to_numpy(), rows["gid"].to_numpy(), rows["phash"].to_numpy()
    gi = np.searchsorted(groups["rep"].to_numpy(), rep)  # every rep has its group
    near, ci = lookup(comps["rep"].to_numpy(), rep)  # reps with a near component

    def pick(comp_col: str, fallback: np.ndarray) -> np.ndarray:
        return np.where(near, comps[comp_col].to_numpy()[ci], fallback) if comps.num_rows else fallback

    label, win_rep = pick("label", rep), pick("win_rep", rep)
    size = pick("size", groups["size"].to_numpy()[gi])
    win, win_phash = pick("win", groups["win"].to_numpy()[gi]), pick("win_phash", groups["win_phash"].to_numpy()[gi])
    win_key = groups["win_key"].take(pa.array(gi))
    if comps.num_rows:
        win_key = pc.if_else(pa.array(near), comps["win_key"].take(pa.array(ci)), win_key)
    dup, sha, distance = gid != win, rep == win_rep, mih.hamming(phash, win_phash).astype(np.int8)
    d = np.flatnonzero(dup)
    dups = pa.table({"gid": gid[d], "sha": sha[d], "distance": distance[d], "ref": win_key.take(pa.array(d))}, schema=DUP_SCHEMA)
    buckets.write(layout.path("dups", bucket), dups, layout.block_of(gid[d]))
    m = np.flatnonzero(size >= 2)
    members = pa.table({"label": label[m], "gid": gid[m], "key": rows["key"].take(pa.array(m)),
                        "shard": rows["shard"].take(pa.array(m)), "distance": distance[m], "dup": dup[m], "sha": sha[m]},
                       schema=MEMBER_SCHEMA)
    buckets.write(layout.path("members", bucket), members, layout.label_part(label[m]))
    return {"rows": int(gid.size), "duplicates": int(d.size), "grouped": int(m.size)}


# ---------------------------------------------------------------- ledgers, keep rows, groups


@measured
def ledgers(layout: Layout, block: int, shards: list[tuple[str, str, int]], out: str) -> dict:
    """Unit: the ledger part of each shard of a block ((hash part, shard name, first gid) each),
    and the block's keep rows (sorted by shard, then key)."""
    dups = buckets.read([layout.path("dups", b) for b in range(layout.buckets)], block, schema=DUP_SCHEMA)
    dups = dups.take(pc.sort_indices(dups["gid"]))
    ph, hosts = load_placeholders([layout.path("placeholders", b) for b in range(layout.buckets)]
                                  if layout.placeholder_hosts > 0 else [])
    keep, counts = [], {s: 0 for s in ledger.STATES}
    for path, name, first in shards:
        part = shard_ledger(storage.read_parquet(path, columns=["key", "row", "phash", "error"]), name, first, dups, ph, hosts)
        ledger.write(out, keeplist.shard_id(name), part)
        kept = part.filter(pc.equal(part["state"], "kept"))
        keep.append(pa.table({"key": kept["key"], "shard": kept["source"]}, schema=keeplist.SCHEMA))
        for s, n in zip(*np.unique(part["state"].to_numpy(zero_copy_only=False), return_counts=True)):
            counts[str(s)] += int(n)
    table = pa.concat_tables(keep) if keep else keeplist.SCHEMA.empty_table()
    atomic.write_parquet(layout.path("keep", block), table.sort_by([("shard", "ascending"), ("key", "ascending")]))
    return {**counts}


def shard_ledger(t: pa.Table, name: str, first: int, dups: pa.Table, ph: np.ndarray, hosts: np.ndarray) -> pa.Table:
    """One shard's ledger rows from its hash part: failed (hashing's error), placeholder,
    duplicate (the resolved outcomes `dups`, by gid) or kept; in the part's row order."""
    n = t.num_rows
    failed = t["error"].is_valid().to_numpy(zero_copy_only=False)
    is_ph, pi = lookup(ph, t["phash"].fill_null(0).to_numpy())
    is_ph &= ~failed
    is_dup, di = lookup(dups["gid"].to_numpy(), first + np.arange(n))
    is_dup &= ~failed & ~is_ph
    state = np.where(failed, "failed", np.where(is_ph, "filtered", np.where(is_dup, "duplicate", "kept"))).astype(object)
    reason = np.full(n, None, object)
    value = np.full(n, None, object)
    ref = np.full(n, None, object)
    reason[failed] = np.asarray(t["error"].to_numpy(zero_copy_only=False), object)[failed]
    reason[is_ph], value[is_ph] = "placeholder", [f"{h} hosts" for h in hosts[pi[is_ph]].tolist()]
    if dups.num_rows:
        sha = dups["sha"].to_numpy(zero_copy_only=False)[di[is_dup]]
        reason[is_dup] = np.where(sha, "sha256", "phash")
        value[is_dup] = [f"distance {d}" for d in dups["distance"].to_numpy()[di[is_dup]].tolist()]
        ref[is_dup] = np.asarray(dups["ref"].to_numpy(zero_copy_only=False), object)[di[is_dup]]
    return ledger.conform(pa.table({
        "step": pa.array([STEP_NAME] * n, pa.string()), "source": pa.array([name] * n, pa.string()), "row": t["row"],
        "key": t["key"], "state": pa.array(state.tolist(), pa.string()), "reason": pa.array(reason.tolist(), pa.string()),
        "value": pa.array(value.tolist(), pa.string()), "ref": pa.array(ref.tolist(), pa.string())}))


@measured
def groups(layout: Layout, part: int, shard_names: list[str]) -> dict:
    """Unit: the _groups rows of one label range: members kept-first, then by distance and gid."""
    m = buckets.read([layout.path("members", b) for b in range(layout.buckets)], part, schema=MEMBER_SCHEMA)
    label, dup = m["label"].to_numpy(), m["dup"].to_numpy(zero_copy_only=False)
    order = np.lexsort((m["gid"].to_numpy(), m["distance"].to_numpy(), dup.astype(np.int8), label))
    m = m.take(pa.array(order))
    label, dup = label[order], dup[order]
    starts = first_of_runs(label)
    offsets = pa.array(np.r_[starts, m.num_rows].astype(np.int32))
    names = pa.array(shard_names, pa.string()).take(m["shard"].combine_chunks())
    reasons = np.where(dup, np.where(m["sha"].to_numpy(zero_copy_only=False), "sha256", "phash"), "kept")
    keys = m["key"].combine_chunks()
    out = pa.table({
        "group_id": pa.array(np.zeros(starts.size, np.int64)), "kept_key": keys.take(pa.array(starts)),
        "kept_shard": names.take(pa.array(starts)), "size": pa.array(np.diff(np.r_[starts, m.num_rows]).astype(np.int64)),
        "members": pa.ListArray.from_arrays(offsets, keys), "member_shards": pa.ListArray.from_arrays(offsets, names),
        "distances": pa.ListArray.from_arrays(offsets, m["distance"].combine_chunks()),
        "reasons": pa.ListArray.from_arrays(offsets, pa.array(reasons.tolist(), pa.string())),
    }, schema=GROUPS_SCHEMA)
    atomic.write_parquet(layout.path("groupparts", part), out)
    return {"groups": out.num_rows}


@measured
def finish(layout: Layout, blocks: int, out: str) -> dict:
    """Unit: keep.parquet (core.keeplist) and _groups.parquet (group ids in label order), each
    streamed from its parts in order: one part in memory at a time."""
    kept = _concat(storage.path(out) / "keep.parquet", [layout.path("keep", b) for b in range(blocks)], keeplist.SCHEMA,
                   keeplist.ROW_GROUP)
    n_groups = _concat(storage.path(out) / "_groups.parquet",
                       [layout.path("groupparts", p) for p in range(layout.group_parts)], GROUPS_SCHEMA, None, number=True)
    return {"kept": kept, "groups": n_groups}


def _concat(target: storage.AnyPath, parts: list[str], schema: pa.Schema, row_group: int | None,
            number: bool = False) -> int:
    n = 0
    with atomic.atomic_path(target) as tmp, pq.ParquetWriter(tmp, schema) as writer:
        for part in parts:
            t = storage.read_parquet(part)
            if number:
                t = t.set_column(0, "group_id", pa.array(np.arange(n, n + t.num_rows, dtype=np.int64)))
            writer.write_table(t.cast(schema), row_group_size=row_group)
            n += t.num_rows
        if not parts:
            writer.write_table(schema.empty_table())
    return n
