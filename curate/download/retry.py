"""`--retry-failed`: the transient failures of each original shard, with their full input rows.

One unit per original shard S (`select_unit`): its ledger part gives each row's final outcome
and the key of the attempt that produced it; the rows whose reason is transient
(`curate.download.errors.is_transient`) are looked up by key in the parquets of the shards that
hold those keys (S or its retry shards) and written, with their input columns, to
OUT/_retry/_select/<S>.parquet. Keys stay Arrow arrays (`is_in` against one shard's keys): no
task or driver holds a Python set of every key. `read_parts` streams the parts back in shard
order for `curate.download.plan.add_retry_shards`, one part at a time.
"""
from __future__ import annotations

from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from core import atomic, storage
from curate.download.errors import TRANSIENT
from curate.download.plan import SOURCE_COLUMNS

SELECT_DIR = "_retry/_select"


def transient(reason: pa.ChunkedArray | pa.Array) -> pa.Array:
    """Per ledger reason: True for a transient failure category (vectorised is_transient)."""
    listed = pc.is_in(reason, value_set=pa.array(sorted(TRANSIENT), pa.string()))
    return pc.fill_null(pc.or_(listed, pc.match_substring_regex(reason, r"^http_5\d\d$")), False)


def select_unit(ledger_part: str, shard_parquets: list[str], key_digits: int, columns: dict[str, Any],
                out: str) -> dict[str, Any]:
    """Unit: the input rows (original column names, with SOURCE_COLUMNS) of one original
    shard's transient failures, in input order, to `out`; `shard_parquets`: the parquets of
    the shard and of its retry shards."""
    led = storage.read_parquet(ledger_part, columns=["key", "state", "reason"])
    led = led.filter(pc.and_(pc.equal(led["state"], "failed"), transient(led["reason"])))
    if led.num_rows == 0:
        return {"rows": 0}
    keys = led["key"].combine_chunks()
    shards = np.unique(pc.cast(keys, pa.int64()).to_numpy() // 10 ** key_digits)
    wanted = ["url", "caption", *columns["extra"], *SOURCE_COLUMNS]
    found = []
    for path in shard_parquets:
        if int(storage.path(path).stem) in shards:
            t = storage.read_parquet(path, columns=["key", *wanted])
            found.append(t.filter(pc.is_in(t["key"], value_set=keys)).select(wanted))
    rows = pa.concat_tables(found).sort_by("source_row")
    if rows.num_rows != led.num_rows:
        raise RuntimeError(f"{ledger_part}: {led.num_rows} transient failures, {rows.num_rows} found in {shard_parquets}")
    names = {"url": columns["url"], "caption": columns["caption"]}
    atomic.write_parquet(out, rows.rename_columns([names.get(c, c) for c in rows.column_names]))
    return {"rows": rows.num_rows, "files": [storage.path(out).name]}


def read_parts(paths: list[str]) -> Iterator[pa.Table]:
    """The selected rows, part by part, in the order given."""
    for path in paths:
        yield storage.read_parquet(path)
