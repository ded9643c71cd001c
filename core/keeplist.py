"""The keep list: which samples of which image shards go on to the next step.

`curate neardup` writes it (OUT/keep.parquet); `curate score` and `pretokenize --keep-list`
read it. One parquet file, sorted by shard then key, columns:
    key    string  the sample's webdataset key, e.g. "000120042"
    shard  string  the image shard's file name, e.g. "00012.tar"
A shard is named by its stem everywhere else (`shard_id`): "/x/00012.tar", "00012.tar" and
"00012" are one shard. Readers take the keys of one shard at a time, so a task holds its own
shard's keys, never the whole list (a keep list of 200M images is ~5 GB as Python strings).
The list may be a local file or an object (s3://, gs://; core.storage).
"""
from __future__ import annotations

import os
from pathlib import PurePath

import pyarrow as pa
import pyarrow.parquet as pq

from core import atomic, storage
from core.errors import UserError

SCHEMA = pa.schema([("key", pa.string()), ("shard", pa.string())])
ROW_GROUP = 1 << 20  # rows per row group: a reader of one shard skips the others by statistics


def shard_id(name: str | os.PathLike) -> str:
    """'/x/00012.tar', '00012.tar' or '00012' -> '00012'."""
    base = PurePath(str(name)).name
    return base[: -len(".tar")] if base.endswith(".tar") else base


def write(path: str | os.PathLike, table: pa.Table) -> int:
    """Write `key`, `shard` columns (shard as a tar file name) sorted by shard then key; returns rows."""
    names = [f"{shard_id(s)}.tar" for s in table.column("shard").to_pylist()]
    keep = pa.table({"key": table.column("key").cast(pa.string()), "shard": pa.array(names, pa.string())}, schema=SCHEMA)
    keep = keep.sort_by([("shard", "ascending"), ("key", "ascending")])
    with atomic.atomic_path(path) as tmp:
        pq.write_table(keep, tmp, row_group_size=ROW_GROUP)
    return keep.num_rows


def check(path: str | os.PathLike) -> None:
    """Fail with a clear message unless `path` is a readable keep list."""
    try:
        with storage.parquet_file(path) as f:
            schema = f.schema_arrow
        names = schema.names
    except FileNotFoundError:
        raise UserError(f"keep list not found: {path}") from None
    except (OSError, pa.ArrowInvalid) as exc:
        raise UserError(f"keep list {path}: not a readable parquet file ({exc})") from exc
    if not {"key", "shard"} <= set(names):
        raise UserError(f"keep list {path}: needs `key` and `shard` columns, has {', '.join(names)}")
    for name in ("key", "shard"):  # a number would lose the keys' leading zeros ('000010002')
        typ = schema.field(name).type
        if not _is_text(typ):
            raise UserError(f"keep list {path}: column `{name}` is {typ}, must be text (sample keys and shard "
                            "names as img2dataset writes them, e.g. key '000010002', shard '00001.tar')")


def _is_text(typ: pa.DataType) -> bool:
    if pa.types.is_dictionary(typ):
        typ = typ.value_type
    return pa.types.is_string(typ) or pa.types.is_large_string(typ) or pa.types.is_string_view(typ)


def canonical(path: str | os.PathLike, folder: str | os.PathLike) -> str:
    """`path` if every shard in it is spelled "00012.tar" or "00012", else a normalised copy
    written to folder/_keep.parquet (a hand-made list naming shards by path); checks it first."""
    check(path)
    import pyarrow.compute as pc

    names = pc.unique(storage.read_parquet(path, columns=["shard"]).column("shard").cast(pa.string())).to_pylist()
    if all(n is not None and n in (shard_id(n), f"{shard_id(n)}.tar") for n in names):
        return str(storage.path(path))
    target = str(storage.path(folder) / "_keep.parquet")
    write(target, storage.read_parquet(path, columns=["key", "shard"]))
    return target


def keys_for(path: str | os.PathLike, shard: str | os.PathLike) -> frozenset[str]:
    """The kept keys of one shard (any spelling of its name)."""
    sid = shard_id(shard)
    table = storage.read_parquet(path, columns=["key"], filters=[("shard", "in", [f"{sid}.tar", sid])])
    return frozenset(table.column("key").cast(pa.string()).to_pylist())
