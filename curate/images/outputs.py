"""Near-dup outputs: kept-only shards (a unit per shard), and the single-pass reference outputs.

`write_kept_shard` is the step's unit for `write_shards`. `keep_table`, `groups_table` and
`write_ledger` build the step's outputs from `grouping.decide`'s single-pass decisions: the
reference that the task-based grouping (`curate.images.group_tasks`) must equal, used by the
tests and by bench/scale_neardup.py's baseline, not by the step."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa

from core import atomic, keeplist, ledger, storage
from core.imageshard import iter_shard, write_shard
from curate.images.grouping import Decisions

STEP_NAME = "neardup"

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


def write_kept_shard(shard: str, keep_list: str, out: str) -> dict:
    """Unit: OUT/<shard>.tar with only the kept samples, plus their img2dataset parquet rows
    (the shard, the keep list and OUT may be local or on an object store)."""
    shard_path, out_path = storage.path(shard), storage.path(out)
    wanted = keeplist.keys_for(keep_list, shard)
    n = write_shard(out_path / shard_path.name, (s for s in iter_shard(shard_path) if s.key in wanted))
    files = [shard_path.name]
    meta_path = shard_path.with_suffix(".parquet")
    if meta_path.exists():
        meta = storage.read_parquet(meta_path)
        if "key" in meta.column_names:
            mask = pa.array([k in wanted for k in meta["key"].to_pylist()], pa.bool_())
            atomic.write_parquet(out_path / meta_path.name, meta.filter(mask))
            files.append(meta_path.name)
    return {"samples": n, "files": files}
