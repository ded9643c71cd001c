"""The shard plan of a download (OUT/_plan.json): which input rows each numbered shard holds.

Every input file is cut into shards of `samples_per_shard` rows, numbered from 0 in file
order; `--retry-failed` appends retry shards that re-queue rows of earlier shards (their
inputs are written to OUT/_retry/NNNNN.parquet). The plan is written once and only grows,
so a rerun, a resumed run and a retry all agree on what shard N holds.

Every input row carries SOURCE_COLUMNS through img2dataset into its sample's .json and the
shard parquet: they tie each outcome back to exactly one input row.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable

import pyarrow as pa
import pyarrow.compute as pc

from core import atomic, storage
from core.storage import AnyPath

SOURCE_COLUMNS = ("source_file", "source_row", "source_shard")
VERSION = 2


@dataclass(frozen=True)
class ShardEntry:
    id: int  # the shard's number: its files are <name(id)>.tar/.parquet/_stats.json
    file: str  # the parquet file its rows come from (an input file, or its _retry/ part)
    start: int  # rows [start, stop) of `file`
    stop: int
    source: str | None = None  # the input file's name (original shards); None for retry shards
    retry_of: tuple[int, ...] = ()  # original shards whose failed rows this retry shard re-queues

    @property
    def rows(self) -> int:
        return self.stop - self.start

    @property
    def is_retry(self) -> bool:
        return bool(self.retry_of)


@dataclass
class ShardPlan:
    digits: int  # shard name width; room for retry shards after the originals
    key_digits: int  # sample key = shard id * 10**key_digits + index, as img2dataset computes it
    shards: list[ShardEntry] = field(default_factory=list)
    version: int = VERSION

    def name(self, shard_id: int) -> str:
        return f"{shard_id:0{self.digits}d}"

    def originals(self) -> list[ShardEntry]:
        return [e for e in self.shards if not e.is_retry]

    def children(self) -> dict[int, list[int]]:
        """original shard id -> ids of the retry shards holding some of its rows, in order."""
        out: dict[int, list[int]] = {}
        for e in self.shards:
            for origin in e.retry_of:
                out.setdefault(origin, []).append(e.id)
        return out

    def shard_of_key(self, key: str) -> int:
        return int(key) // 10 ** self.key_digits

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> "ShardPlan":
        shards = [ShardEntry(**{**e, "retry_of": tuple(e.get("retry_of") or ())}) for e in doc["shards"]]
        return cls(doc["digits"], doc["key_digits"], shards, doc.get("version", VERSION))

    def save(self, path: AnyPath) -> None:
        atomic.write_json(path, self.to_json())

    @classmethod
    def load(cls, path: AnyPath) -> "ShardPlan":
        return cls.from_json(json.loads(path.read_text()))


def make_plan(files: list[AnyPath], samples_per_shard: int) -> ShardPlan:
    """Cut every input file (local or on an object store) into shards of `samples_per_shard`
    rows, numbered from 0."""
    shards: list[ShardEntry] = []
    for f in map(storage.path, files):
        with storage.parquet_file(f) as pf:
            n = pf.metadata.num_rows
        for start in range(0, n, samples_per_shard):
            stop = min(n, start + samples_per_shard)
            shards.append(ShardEntry(len(shards), str(f), start, stop, source=f.name))
    return ShardPlan(
        digits=max(5, len(str(len(shards))) + 1),
        key_digits=math.ceil(math.log10(samples_per_shard)),
        shards=shards,
    )


def add_retry_shards(plan: ShardPlan, parts: Iterable[pa.Table], samples_per_shard: int,
                     folder: AnyPath) -> list[ShardEntry]:
    """Append shards re-queueing the rows of `parts` (full input rows with SOURCE_COLUMNS, a
    stream of tables) after the last shard, `samples_per_shard` rows each; their inputs go to
    folder/NNNNN.parquet. At most one shard's rows are held at a time. Returns the new entries."""
    new: list[ShardEntry] = []
    pending: list[pa.Table] = []

    def flush(rows: pa.Table) -> None:
        sid = len(plan.shards) + len(new)
        path = folder / f"{plan.name(sid)}.parquet"
        atomic.write_parquet(path, rows)
        origins = tuple(sorted(set(pc.unique(rows.column("source_shard")).to_pylist())))
        new.append(ShardEntry(sid, str(path), 0, rows.num_rows, retry_of=origins))

    for part in parts:
        pending.append(part)
        while sum(t.num_rows for t in pending) >= samples_per_shard:
            rows = pa.concat_tables(pending).combine_chunks()
            flush(rows.slice(0, samples_per_shard))
            pending = [rows.slice(samples_per_shard)]
    rest = pa.concat_tables(pending) if pending else None
    if rest is not None and rest.num_rows:
        flush(rest)
    plan.shards.extend(new)
    return new
