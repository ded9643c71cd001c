"""`curate near-dup`: drop exact and near-duplicate images from webdataset image shards.

Two passes:
  1. hash (one Ray task per shard, idempotent): decode each image once and record its
     sha256, 64-bit pHash (imagehash), URL host, aesthetic and original size in
     OUT/_hashes/<shard>.parquet; an undecodable image is recorded with its reason.
  2. group (once, on the driver): placeholders first (a pHash seen under >= N distinct URL
     hosts is an "image not available" picture: every copy is `filtered`), then exact
     duplicates by sha256, then pHash neighbours within Hamming distance d found by
     multi-index hashing (`curate.mih`), joined into connected components. One image per
     component is kept: highest aesthetic, then largest original w*h, then smallest key.

Outputs (OUT): keep.parquet (key, shard) for `pretokenize --keep-list`; _groups.parquet (each
group: members, shards, distances to the kept image, reasons); the ledger; _stats.json;
with `write_shards`, OUT/<shard>.tar (+ its img2dataset parquet) holding only kept samples.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from rich.console import Console

from core import atomic, ledger
from core.config import to_dict
from core.imageshard import ReadReport, iter_shard, list_shards, write_shard
from core.progress import ray_results
from core.ray_util import init_ray
from core.rundir import RunDir
from curate import mih
from curate.image_decode import DEFAULT_MAX_PIXELS, DecodeError, open_image
from curate.steps import Step

STEP_NAME = "near-dup"
HASH_DIR = "_hashes"

# One row per sample read (or listed as a success in the shard's parquet but missing from the tar).
HASH_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("shard", pa.string()),  # the tar's file name, e.g. "00012.tar"
        ("row", pa.int64()),  # position in the shard (read order)
        ("sha256", pa.string()),
        ("phash", pa.uint64()),  # imagehash.phash, 8x8 bits row-major, first bit = most significant
        ("host", pa.string()),  # URL host without "www.", for placeholder detection
        ("aesthetic", pa.float64()),
        ("width", pa.int64()),  # original_width from the sample json, else the decoded width
        ("height", pa.int64()),
        ("error", pa.string()),  # why the image could not be hashed; null when it was
    ]
)


@dataclass
class NearDupConfig:
    # Largest Hamming distance between two 64-bit pHashes that still makes them duplicates.
    # 4 of 64 bits catches re-encodes, resizes and small crops; above ~10 unrelated images join.
    distance: int = 4
    # A pHash found under at least this many distinct URL hosts is a placeholder ("image not
    # available", a blank tile): every copy is filtered with reason "placeholder". 0 disables.
    placeholder_hosts: int = 20
    # Images with more pixels than this (read from the header) fail instead of being decoded.
    max_pixels: int = DEFAULT_MAX_PIXELS
    # Also write OUT/<shard>.tar with only the kept samples (copies the images).
    write_shards: bool = False
    # Multi-index hashing band count (>= distance+1); null picks the fastest for the input size.
    # Results do not depend on it.
    bands: int | None = None

    def __post_init__(self) -> None:
        if not 0 <= self.distance <= 16:
            raise ValueError(f"distance must be in 0..16 bits of 64, got {self.distance}")
        if self.placeholder_hosts < 0:
            raise ValueError(f"placeholder_hosts must be >= 0 (0 disables), got {self.placeholder_hosts}")
        if self.max_pixels < 1:
            raise ValueError(f"max_pixels must be >= 1, got {self.max_pixels}")
        if self.bands is not None and not self.distance + 1 <= self.bands <= 64:
            raise ValueError(f"bands must be in distance+1..64 = {self.distance + 1}..64, got {self.bands}")


# ---------------------------------------------------------------- pass 1: hashing (per shard)


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


def _number(value: Any) -> float | None:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return None if np.isnan(out) else out


def hash_sample(sample: Any, shard: str, row: int, max_pixels: int, cache: dict[str, int]) -> dict[str, Any]:
    """One HASH_SCHEMA row for a sample; `cache` maps sha256 -> pHash within the shard."""
    meta = sample.meta or {}
    data = sample.image or b""
    sha = meta.get("sha256") or hashlib.sha256(data).hexdigest()
    aesthetic = _number(meta.get("aesthetic", meta.get("AESTHETIC_SCORE")))
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


def missing_rows(shard: Path, seen: set[str], report: ReadReport, start: int) -> list[dict[str, Any]]:
    """Rows for samples img2dataset lists as successes but the tar does not hold (a damaged tar)."""
    meta_path = shard.with_suffix(".parquet")
    if not meta_path.exists():
        return []
    table = pq.read_table(meta_path)
    if not {"key", "status"} <= set(table.column_names):
        return []
    why = f"missing from {shard.name}: {report.damaged or 'not in the tar'}"
    keys = [k for k, s in zip(table["key"].to_pylist(), table["status"].to_pylist()) if s == "success" and k not in seen]
    return [{"key": k, "shard": shard.name, "row": start + i, "error": why} for i, k in enumerate(keys)]


def hash_shard(shard: Path, part: Path, max_pixels: int) -> dict[str, Any]:
    """Hash every sample of one shard into `part` (atomic); returns the shard's read report."""
    report = ReadReport(str(shard))
    cache: dict[str, int] = {}
    records = [hash_sample(s, shard.name, i, max_pixels, cache) for i, s in enumerate(iter_shard(shard, report))]
    records += missing_rows(shard, {r["key"] for r in records}, report, len(records))
    table = pa.Table.from_pylist(records, schema=HASH_SCHEMA)
    atomic.write_parquet(part, table)
    return {"rows": table.num_rows, "damaged": report.damaged, "refused": len(report.refused)}


def hash_task(run_dir: RunDir, shard: str, max_pixels: int) -> dict[str, Any]:
    """Ray task: hash one shard unless its marker says it is done."""
    task = f"hash.{Path(shard).stem}"
    if run_dir.is_done(task):
        return run_dir.done_info(task)
    info = hash_shard(Path(shard), run_dir.path / HASH_DIR / f"{Path(shard).stem}.parquet", max_pixels)
    run_dir.mark_done(task, info)
    return info


# ---------------------------------------------------------------- pass 2: grouping (global)


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
    """Group root of each row: equal sha256 first (collapsed), then pHash within d (MIH).
    `sha` may be the digests or any integer codes of them."""
    _, first, inverse = np.unique(sha, return_index=True, return_inverse=True)
    rep_labels = mih.group_labels(phash[first], d, bands)  # index into `first`
    return first[rep_labels][inverse]


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


def decide(table: pa.Table, cfg: NearDupConfig) -> Decisions:
    """Ledger outcome of every hash row (see module doc for the order of the rules)."""
    n = table.num_rows
    phash = table["phash"].fill_null(0).to_numpy().astype(np.uint64)
    out = Decisions(np.full(n, "kept", object), np.full(n, None, object), np.full(n, None, object),
                    np.full(n, None, object), np.full(n, -1, np.int64), np.full(n, -1, np.int64))
    failed = table["error"].is_valid().to_numpy(zero_copy_only=False)
    out.state[failed] = "failed"
    out.reason[failed] = table["error"].filter(pa.array(failed)).to_pylist()
    ok = np.flatnonzero(~failed)
    placeholders = placeholder_hashes(phash[ok], codes(table["host"])[ok], cfg.placeholder_hosts)
    is_ph = np.isin(phash[ok], np.array(list(placeholders), dtype=np.uint64))
    ph_rows = ok[is_ph]
    out.state[ph_rows], out.reason[ph_rows] = "filtered", "placeholder"
    out.value[ph_rows] = [f"{placeholders[int(h)]} hosts" for h in phash[ph_rows]]
    _group_and_keep(table, ok[~is_ph], phash, cfg, out)
    return out


def _group_and_keep(table: pa.Table, rows: np.ndarray, phash: np.ndarray, cfg: NearDupConfig, out: Decisions) -> None:
    """Fill `out` for the rows that take part in grouping (decoded, not placeholders)."""
    if rows.size == 0:
        return
    sha_code = codes(table["sha256"])  # equal digests <-> equal codes (hashing, not sorting strings)
    group = rows[components(sha_code[rows], phash[rows], cfg.distance, cfg.bands)]
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


# ---------------------------------------------------------------- outputs


def keep_table(table: pa.Table, dec: Decisions) -> pa.Table:
    """keep.parquet: one row per kept sample (key, shard), sorted by shard then key."""
    kept = table.filter(pa.array(dec.state == "kept")).select(["key", "shard"])
    return kept.sort_by([("shard", "ascending"), ("key", "ascending")])


def groups_table(table: pa.Table, dec: Decisions) -> pa.Table:
    """_groups.parquet: one row per group of >= 2 images, members kept-first then by distance."""
    in_group = np.flatnonzero(dec.group >= 0)
    roots, sizes = np.unique(dec.group[in_group], return_counts=True)
    rows = in_group[np.isin(dec.group[in_group], roots[sizes > 1])].astype(np.int64)
    is_dup = (dec.state[rows] == "duplicate").astype(np.int64)
    rows = rows[np.lexsort((rows, dec.distance[rows], is_dup, dec.group[rows]))]
    starts = np.flatnonzero(np.r_[True, dec.group[rows][1:] != dec.group[rows][:-1]]) if rows.size else rows
    offsets = pa.array(np.r_[starts, rows.size].astype(np.int32))
    keys, shards = table["key"].take(pa.array(rows)), table["shard"].take(pa.array(rows))
    reason = [r if s == "duplicate" else "kept" for r, s in zip(dec.reason[rows], dec.state[rows])]
    return pa.table({
        "group_id": pa.array(np.arange(starts.size, dtype=np.int64)),
        "kept_key": keys.take(pa.array(starts)), "kept_shard": shards.take(pa.array(starts)),
        "size": pa.array(np.diff(np.r_[starts, rows.size]).astype(np.int64)),
        "members": pa.ListArray.from_arrays(offsets, keys.combine_chunks()),
        "member_shards": pa.ListArray.from_arrays(offsets, shards.combine_chunks()),
        "distances": pa.ListArray.from_arrays(offsets, pa.array(dec.distance[rows].astype(np.int8))),
        "reasons": pa.ListArray.from_arrays(offsets, pa.array(reason, pa.string())),
    })


def write_ledger(out: Path, table: pa.Table, dec: Decisions) -> None:
    """One ledger part per input shard (one sort, then slices: linear in rows and shards)."""
    full = pa.table({
        "step": pa.array([STEP_NAME] * table.num_rows), "source": table["shard"], "row": table["row"],
        "key": table["key"], "state": pa.array(dec.state.tolist(), pa.string()),
        "reason": pa.array(dec.reason.tolist(), pa.string()), "value": pa.array(dec.value.tolist(), pa.string()),
        "ref": pa.array(dec.ref.tolist(), pa.string()),
    }).sort_by([("source", "ascending"), ("row", "ascending")])
    source = np.array(full["source"].to_pylist(), dtype=object)
    starts = np.flatnonzero(np.r_[True, source[1:] != source[:-1]]) if source.size else np.zeros(0, np.int64)
    for start, end in zip(starts.tolist(), np.r_[starts[1:], source.size].tolist()):
        ledger.write(out, Path(source[start]).stem, full.slice(start, end - start))


def write_kept_shard(run_dir: RunDir, shard: str, keep: list[str]) -> int:
    """Ray task: OUT/<shard>.tar with only the kept samples, plus the img2dataset parquet rows."""
    task = f"write.{Path(shard).stem}"
    if run_dir.is_done(task):
        return int(run_dir.done_info(task)["samples"])
    wanted = set(keep)
    n = write_shard(run_dir.path / Path(shard).name, (s for s in iter_shard(shard) if s.key in wanted))
    meta_path = Path(shard).with_suffix(".parquet")
    if meta_path.exists():
        meta = pq.read_table(meta_path)
        if "key" in meta.column_names:
            mask = pa.array([k in wanted for k in meta["key"].to_pylist()], pa.bool_())
            atomic.write_parquet(run_dir.path / meta_path.name, meta.filter(mask))
    run_dir.mark_done(task, {"samples": n})
    return n


# ---------------------------------------------------------------- the step


def run(cfg: NearDupConfig, inp: str, out: str) -> dict[str, Any]:
    """Hash every shard of `inp`, group, write OUT; returns the stats (see module doc)."""
    import ray

    shards = list_shards(inp)
    if not shards:
        raise FileNotFoundError(f"{inp}: no .tar image shards found")
    run_dir = RunDir.open(out, STEP_NAME, {"input": str(Path(inp).resolve()), **to_dict(cfg)})
    init_ray()
    remote = ray.remote(num_cpus=1)(hash_task)
    infos = ray_results([remote.remote(run_dir, str(s), cfg.max_pixels) for s in shards], "near-dup: hashing shards")
    table = pa.concat_tables([pq.read_table(run_dir.path / HASH_DIR / f"{s.stem}.parquet", schema=HASH_SCHEMA) for s in shards])
    Console(stderr=True).print(f"near-dup: grouping {table.num_rows:,} images (distance <= {cfg.distance})")
    dec = decide(table, cfg)
    keep = keep_table(table, dec)
    atomic.write_parquet(run_dir.path / "keep.parquet", keep)
    groups = groups_table(table, dec)
    atomic.write_parquet(run_dir.path / "_groups.parquet", groups)
    write_ledger(run_dir.path, table, dec)
    if cfg.write_shards:
        _write_shards(run_dir, shards, keep)
    damaged = {s.name: i["damaged"] for s, i in zip(shards, infos) if i.get("damaged")}
    stats = ledger.write_stats(run_dir.path, STEP_NAME, table.num_rows, ledger.counts(run_dir.path),
                               groups=groups.num_rows, shards=len(shards), damaged_shards=damaged,
                               refused_members=sum(int(i.get("refused", 0)) for i in infos))
    return stats


def _write_shards(run_dir: RunDir, shards: list[Path], keep: pa.Table) -> None:
    import ray

    by_shard: dict[str, list[str]] = {}
    for key, shard in zip(keep["key"].to_pylist(), keep["shard"].to_pylist()):
        by_shard.setdefault(shard, []).append(key)
    remote = ray.remote(num_cpus=1)(write_kept_shard)
    refs = [remote.remote(run_dir, str(s), by_shard.get(s.name, [])) for s in shards]
    ray_results(refs, "near-dup: writing kept shards")


STEP = Step(STEP_NAME, NearDupConfig, run)
