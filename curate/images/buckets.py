"""Bucketed files: how near-dup grouping's tasks hand rows to each other (a shuffle through files).

A task that sends rows to several downstream tasks writes ONE parquet file whose rows are
sorted by a `bucket` column (uint32), one row group per bucket; the downstream task for bucket b
reads, from each such file, only the row groups whose `bucket` statistics contain b. Files
created stay O(tasks), not O(tasks x buckets), and a reader touches O(files) row groups. Files
may be local or on an object store (core.storage); they are written whole (core.atomic), and
the tasks' markers name them, so no reader lists a folder.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from core import atomic, storage

BUCKET = "bucket"
READ_THREADS = 8  # files read at once (an object store answers each request in tens of ms)


def write(path: str | os.PathLike, table: pa.Table, bucket: np.ndarray) -> dict[int, int]:
    """Write `table` with its rows grouped by `bucket` (one int per row) into one file at `path`;
    returns rows per non-empty bucket."""
    bucket = np.asarray(bucket, dtype=np.uint32)
    order = np.argsort(bucket, kind="stable")
    ordered = table.take(pa.array(order)).append_column(BUCKET, pa.array(bucket[order], pa.uint32()))
    ids, starts, counts = np.unique(bucket[order], return_index=True, return_counts=True)
    with atomic.atomic_path(path) as tmp, pq.ParquetWriter(tmp, ordered.schema) as writer:
        if ordered.num_rows == 0:
            writer.write_table(ordered)
        for start, n in zip(starts.tolist(), counts.tolist()):
            writer.write_table(ordered.slice(start, n), row_group_size=n)  # one row group per bucket
    return dict(zip(ids.tolist(), counts.tolist()))


def read(paths: Sequence[str], bucket: int, columns: list[str] | None = None, schema: pa.Schema | None = None
         ) -> pa.Table:
    """Every row of `bucket` in the files `paths` (their row groups for it only), without the
    bucket column. `schema` gives the result's columns when no file holds the bucket."""
    with ThreadPoolExecutor(READ_THREADS) as pool:
        parts = [t for t in pool.map(lambda p: _read_one(p, bucket, columns), paths) if t is not None]
    if not parts:
        if schema is None:
            raise ValueError(f"bucket {bucket}: no rows in {len(paths)} files and no schema to shape an empty table")
        return schema.empty_table() if columns is None else schema.empty_table().select(columns)
    return pa.concat_tables(parts)


def _read_one(path: str, bucket: int, columns: list[str] | None) -> pa.Table | None:
    with storage.parquet_file(path) as f:
        index = f.schema_arrow.get_field_index(BUCKET)
        groups = [g for g in range(f.num_row_groups) if _holds(f.metadata.row_group(g).column(index), bucket)]
        if not groups:
            return None
        table = f.read_row_groups(groups, columns=None if columns is None else [*columns, BUCKET])
    table = table.filter(pc.equal(table[BUCKET], pa.scalar(bucket, pa.uint32())))
    return table.drop_columns([BUCKET])


def _holds(column: pq.ColumnChunkMetaData, bucket: int) -> bool:
    stats = column.statistics
    if stats is None or not stats.has_min_max:
        return column.num_values > 0  # no statistics: read it and filter
    return stats.min <= bucket <= stats.max
