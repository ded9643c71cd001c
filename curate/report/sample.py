"""A bounded sample of one column of a parquet folder: up to SPREAD row groups taken at a fixed
stride over all files, the first rows of each, so the bytes read stay near `rows` rows' worth
however large the folder is (text columns are the costly ones: 10M long captions are
gigabytes). Row counts and null counts come from the parquet footers, exactly, without
reading any data."""
from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa
import pyarrow.parquet as pq

SPREAD = 16  # row groups the sample is drawn from (at most)


@dataclass(frozen=True)
class ColumnSample:
    values: pa.ChunkedArray | None  # the sampled values (None: no file has the column)
    rows: int  # rows in the folder (footers)
    nulls: int | None  # null values in the folder (footer statistics; None when a file lacks them)
    sampled_rows: int  # rows read


def _groups(files: list[str], name: str) -> list[tuple[pq.ParquetFile, int, int, int | None]]:
    """(file, row group, rows, nulls) of every row group of the files that hold column `name`."""
    out = []
    for path in files:
        f = pq.ParquetFile(path)
        names = f.schema_arrow.names
        if name not in names:
            continue
        col = names.index(name)
        for i in range(f.metadata.num_row_groups):
            rg = f.metadata.row_group(i)
            stats = rg.column(col).statistics
            nulls = stats.null_count if stats is not None and stats.has_null_count else None
            out.append((f, i, rg.num_rows, nulls))
    return out


def column_sample(files: list[str], name: str, rows: int) -> ColumnSample:
    """About `rows` values of column `name` (all of them when the folder is smaller)."""
    groups = _groups(files, name)
    total = sum(g[2] for g in groups)
    if not groups:
        return ColumnSample(None, 0, None, 0)
    nulls = None if any(g[3] is None for g in groups) else sum(g[3] for g in groups)
    if total <= rows:
        chosen, per = groups, None  # small folder: every row
    else:
        take = min(len(groups), SPREAD)
        chosen, per = [groups[int(i * len(groups) / take)] for i in range(take)], -(-rows // take)
    parts = [_head(f, i, name, per) for f, i, _, _ in chosen]
    values = pa.chunked_array([p.cast(parts[0].type) for p in parts])  # files may differ in width
    return ColumnSample(values, total, nulls, len(values))


def _head(f: pq.ParquetFile, group: int, name: str, rows: int | None) -> pa.Array:
    """The first `rows` values of column `name` in one row group (all of them when None)."""
    if rows is None:
        return f.read_row_group(group, columns=[name]).column(0).combine_chunks()
    batch = next(f.iter_batches(batch_size=rows, row_groups=[group], columns=[name]), None)
    return batch.column(0) if batch is not None else pa.array([], f.schema_arrow.field(name).type)
