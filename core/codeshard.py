"""Code shards: the contract between `pretokenize` (writer) and `train` (reader).

A code folder holds:
    NNNNN.arrow      Arrow IPC *file* format, uncompressed (memory-mappable, zero-copy),
                     one row per image, columns CODE_SCHEMA below
    manifest.json    format version, tokenizer identity, resolution, grid, codebook size,
                     per-shard row counts, byte sizes and sha256
    _config.yaml, _done/, _ledger/   run bookkeeping (see core.rundir, core.ledger)

`codes` is a fixed-size list of uint16 of length h*w (row-major grid), so the whole column
of a shard is one contiguous (N, h*w) uint16 buffer: `CodeShard.codes` is a numpy view of
the memory map, and a sample is O(1) to reach.

pretokenize may write a code folder to an object store (s3://, gs://; core.storage): the
manifest is the completion record that names the shards (on an object store each under an
attempt-unique name), so readers never list the folder. A memory map needs a local file:
`stage` copies the shards the manifest names to a local cache, each checked against its size
and sha256 there, and a later run reuses the checked copy.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from core import atomic, storage
from core.storage import AnyPath
from core.errors import UserError

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SHARD_SUFFIX = ".arrow"


class CodeShardError(UserError):
    """A code folder or shard that does not match what the reader was told to expect."""


def code_schema(num_tokens: int) -> pa.Schema:
    """Schema of a shard whose grids have `num_tokens` = h*w codes."""
    return pa.schema(
        [
            ("key", pa.string()),
            ("codes", pa.list_(pa.uint16(), num_tokens)),
            ("caption", pa.string()),
            ("long_caption", pa.string()),
            ("orig_w", pa.int32()),
            ("orig_h", pa.int32()),
            ("crop_top", pa.int32()),
            ("crop_left", pa.int32()),
            ("aesthetic", pa.float32()),
            ("pwatermark", pa.float32()),
            ("punsafe", pa.float32()),
        ],
        metadata={b"tessera.format_version": str(FORMAT_VERSION).encode()},
    )


@dataclass
class TokenizerInfo:
    """Identity of the VQ tokenizer that produced the codes."""

    sha256: str  # of the weights file (diffusion_pytorch_model.safetensors)
    path: str  # where it was loaded from (informational; the hash is the identity)
    codebook_size: int  # e.g. 8192
    downsample: int  # e.g. 16 for f16


@dataclass
class ShardInfo:
    name: str
    rows: int
    bytes: int
    sha256: str


@dataclass
class Manifest:
    resolution: int
    grid: tuple[int, int]  # (h, w) tokens
    tokenizer: TokenizerInfo
    shards: list[ShardInfo] = field(default_factory=list)
    format_version: int = FORMAT_VERSION
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def codebook_size(self) -> int:
        return self.tokenizer.codebook_size

    @property
    def num_rows(self) -> int:
        return sum(s.rows for s in self.shards)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["grid"] = list(self.grid)
        d["codebook_size"] = self.codebook_size
        d["num_rows"] = self.num_rows
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "Manifest":
        return cls(
            resolution=int(d["resolution"]),
            grid=(int(d["grid"][0]), int(d["grid"][1])),
            tokenizer=TokenizerInfo(**d["tokenizer"]),
            shards=[ShardInfo(**s) for s in d.get("shards", [])],
            format_version=int(d.get("format_version", -1)),
            extra=dict(d.get("extra", {})),
        )


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    """sha256 of a file, local or on an object store (streamed)."""
    h = hashlib.sha256()
    with storage.open_stream(path) as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def codes_array(codes: np.ndarray) -> pa.FixedSizeListArray:
    """(N, h*w) or (N, h, w) integer codes -> the `codes` column (uint16, row-major)."""
    codes = np.ascontiguousarray(codes).reshape(len(codes), -1)
    if codes.size and (codes.min() < 0 or codes.max() > np.iinfo(np.uint16).max):
        raise CodeShardError("codes must lie in [0, 65535] to be stored as uint16")
    flat = pa.array(codes.astype(np.uint16, copy=False).ravel(), type=pa.uint16())
    return pa.FixedSizeListArray.from_arrays(flat, codes.shape[1])


def make_table(codes: np.ndarray, columns: dict[str, Any]) -> pa.Table:
    """Build a shard table: `codes` (N, L) plus every other CODE_SCHEMA column in `columns`
    (lists or arrays of length N; `long_caption` and the scores may be omitted -> null)."""
    n, num_tokens = len(codes), int(np.prod(np.shape(codes)[1:]))
    schema = code_schema(num_tokens)
    arrays = []
    for f in schema:
        if f.name == "codes":
            arrays.append(codes_array(codes))
        elif f.name in columns:
            arrays.append(pa.array(columns[f.name], type=f.type))
        elif f.nullable and f.name in ("long_caption", "aesthetic", "pwatermark", "punsafe"):
            arrays.append(pa.nulls(n, f.type))
        else:
            raise CodeShardError(f"code shard column {f.name!r} is required")
    return pa.Table.from_arrays(arrays, schema=schema)


def write_shard(path: str | os.PathLike, table: pa.Table) -> ShardInfo:
    """Write one shard whole (temp name and rename, or one upload to an object store); returns
    its manifest entry (size and sha256 of the bytes committed)."""
    with atomic.atomic_path(path) as tmp:
        with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
            writer.write_table(table, max_chunksize=max(1, table.num_rows))
        info = ShardInfo(storage.path(path).name, table.num_rows, tmp.stat().st_size, file_sha256(tmp))
    return info


def write_manifest(folder: str | os.PathLike, manifest: Manifest) -> AnyPath:
    manifest.shards.sort(key=lambda s: s.name)
    path = storage.path(folder) / MANIFEST
    atomic.write_json(path, manifest.to_json())
    return path


def read_manifest(folder: str | os.PathLike) -> Manifest:
    path = storage.path(folder) / MANIFEST
    if not path.is_file():
        raise CodeShardError(f"{folder}: no {MANIFEST}; is this a pretokenize output folder?")
    try:
        manifest = Manifest.from_json(json.loads(path.read_text()))
    except (KeyError, TypeError, ValueError) as exc:
        raise CodeShardError(f"{path}: malformed manifest ({exc})") from exc
    if manifest.format_version != FORMAT_VERSION:
        raise CodeShardError(
            f"{path}: code-shard format version {manifest.format_version}, "
            f"this reader understands {FORMAT_VERSION}; re-run pretokenize"
        )
    return manifest


# ---------------------------------------------------------------- staging from an object store

STAGED = "_staged.json"  # in a cache folder: name -> {sha256, bytes, mtime_ns} of each checked copy
STAGE_THREADS = 8  # shards fetched at once


def stage(folder: str | os.PathLike, cache: str | os.PathLike) -> Path:
    """A local copy of the code folder `folder` (an object-store URI) under `cache`, for
    memory-mapping: its manifest and every shard the manifest names, each checked against the
    manifest's byte size and sha256 as it arrives (a mismatch raises CodeShardError). A shard
    checked before (recorded in cache/<folder digest>/_staged.json with the same sha256, and
    unchanged since: same size and time) is reused without being read. The processes of one
    machine (torchrun's ranks) share the copy: one stages it while the others wait on its lock."""
    src = storage.path(folder)
    manifest = read_manifest(src)
    local = Path(cache).expanduser().absolute() / hashlib.sha256(str(src).encode()).hexdigest()[:16]
    local.mkdir(parents=True, exist_ok=True)
    with open(local / "_lock", "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, or the process dies
        staged = json.loads((local / STAGED).read_text()) if (local / STAGED).is_file() else {}
        todo = [s for s in manifest.shards if not _still_checked(local / s.name, s, staged.get(s.name))]
        record_lock = threading.Lock()

        def fetch(info: ShardInfo) -> None:
            entry = _fetch_checked(src / info.name, local / info.name, info)
            with record_lock:
                staged[info.name] = entry
                atomic.write_json(local / STAGED, staged)

        with ThreadPoolExecutor(STAGE_THREADS) as pool:
            list(pool.map(fetch, todo))
        for old in set(staged) - {s.name for s in manifest.shards}:  # shards of an older manifest
            (local / old).unlink(missing_ok=True)
            staged.pop(old)
        atomic.write_json(local / STAGED, staged)
        atomic.write_json(local / MANIFEST, manifest.to_json())  # last: the copy is complete
    return local


def _still_checked(path: Path, info: ShardInfo, entry: dict[str, Any] | None) -> bool:
    if not entry or entry.get("sha256") != info.sha256 or entry.get("bytes") != info.bytes:
        return False
    try:
        st = path.stat()
    except FileNotFoundError:
        return False
    return st.st_size == info.bytes and st.st_mtime_ns == entry.get("mtime_ns")


def _fetch_checked(src: AnyPath, dest: Path, info: ShardInfo) -> dict[str, Any]:
    """Copy `src` to `dest` (temp name, then rename) hashing it on the way; raise unless its
    size and sha256 are the manifest's."""
    h, size = hashlib.sha256(), 0
    with atomic.atomic_path(dest) as tmp, open(tmp, "wb") as out, storage.open_stream(src) as f:
        while block := f.read(1 << 22):
            h.update(block)
            size += len(block)
            out.write(block)
        if (size, h.hexdigest()) != (info.bytes, info.sha256):
            raise CodeShardError(
                f"{src}: {size} bytes with sha256 {h.hexdigest()[:12]}, the manifest says {info.bytes} bytes with "
                f"sha256 {info.sha256[:12]}; the object store holds another file than pretokenize recorded "
                "(re-run pretokenize on that folder)")
    return {"sha256": info.sha256, "bytes": size, "mtime_ns": dest.stat().st_mtime_ns}


class CodeShard:
    """One shard, memory-mapped. `codes` is a zero-copy (N, h*w) uint16 view."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._source = pa.memory_map(str(self.path), "r")
        reader = pa.ipc.open_file(self._source)
        version = (reader.schema.metadata or {}).get(b"tessera.format_version", b"?").decode()
        if version != str(FORMAT_VERSION):
            raise CodeShardError(
                f"{self.path}: format version {version}, expected {FORMAT_VERSION}"
            )
        self.table = reader.read_all()
        col = self.table.column("codes")
        self.num_tokens = col.type.list_size
        values = pa.concat_arrays([c.values for c in col.chunks]) if col.num_chunks > 1 else (
            col.chunk(0).values if col.num_chunks else pa.array([], pa.uint16())
        )
        # The child buffer of a single-chunk fixed-size list is the contiguous code matrix.
        self.codes = values.to_numpy(zero_copy_only=col.num_chunks <= 1).reshape(-1, self.num_tokens)

    def __len__(self) -> int:
        return self.table.num_rows

    def column(self, name: str) -> pa.ChunkedArray:
        return self.table.column(name)


class CodeDataset:
    """Every shard of a code folder, checked against the manifest; global O(1) indexing."""

    def __init__(
        self,
        folder: str | os.PathLike,
        tokenizer_sha256: str | None = None,
        verify_checksums: bool = False,
    ):
        self.folder = Path(folder)
        self.manifest = read_manifest(self.folder)
        if tokenizer_sha256 and tokenizer_sha256 != self.manifest.tokenizer.sha256:
            raise CodeShardError(
                f"{self.folder}: codes were made by tokenizer {self.manifest.tokenizer.sha256[:12]}, "
                f"expected {tokenizer_sha256[:12]}; re-run pretokenize with that tokenizer"
            )
        if not self.manifest.shards:
            raise CodeShardError(f"{self.folder}: the manifest lists no shards")
        self.shards: list[CodeShard] = []
        for info in self.manifest.shards:
            path = self.folder / info.name
            if not path.is_file():
                raise CodeShardError(f"{path}: listed in the manifest but missing; rerun the same `pretokenize` "
                                     "command, which redoes a lost shard")
            size = path.stat().st_size  # free; catches a cut or rewritten shard before Arrow reads it
            if size != info.bytes:
                raise CodeShardError(f"{path}: {size} bytes, the manifest says {info.bytes}: the shard was cut "
                                     f"short or rewritten; rerun the same `pretokenize` command, which redoes it")
            if verify_checksums and file_sha256(path) != info.sha256:
                raise CodeShardError(f"{path}: checksum differs from the manifest")
            shard = CodeShard(path)
            if len(shard) != info.rows:
                raise CodeShardError(f"{path}: {len(shard)} rows, manifest says {info.rows}")
            self.shards.append(shard)
        h, w = self.manifest.grid
        if self.shards[0].num_tokens != h * w:
            raise CodeShardError(f"{self.folder}: shards hold {self.shards[0].num_tokens} codes, grid is {h}x{w}")
        self.offsets = np.cumsum([0] + [len(s) for s in self.shards])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def locate(self, index: int) -> tuple[int, int]:
        """Global row index -> (shard number, row in shard)."""
        if not 0 <= index < len(self):
            raise IndexError(index)
        s = int(np.searchsorted(self.offsets, index, side="right") - 1)
        return s, int(index - self.offsets[s])

    def codes(self, indices: np.ndarray) -> np.ndarray:
        """Gather code grids for global `indices` -> (B, h*w) uint16 (one copy, no decode)."""
        indices = np.asarray(indices, dtype=np.int64)
        shard_of = np.searchsorted(self.offsets, indices, side="right") - 1
        out = np.empty((len(indices), self.shards[0].num_tokens), dtype=np.uint16)
        for s in np.unique(shard_of):
            sel = shard_of == s
            out[sel] = self.shards[s].codes[indices[sel] - self.offsets[s]]
        k = self.manifest.codebook_size
        if out.size and int(out.max()) >= k:  # one pass over a batch; else an IndexError deep in the model
            bad = int(indices[(out >= k).any(axis=1)][0])
            s, r = self.locate(bad)
            raise CodeShardError(f"{self.shards[s].path}: row {r} holds code {int(out.max())}, outside the "
                                 f"{k}-entry codebook the manifest names: the shard is damaged; re-run pretokenize")
        return out

    def row(self, index: int) -> dict[str, Any]:
        """Every column of one row as Python values (codes as a numpy view)."""
        s, r = self.locate(index)
        shard = self.shards[s]
        out = {name: shard.table.column(name)[r].as_py() for name in shard.table.column_names if name != "codes"}
        out["codes"] = shard.codes[r]
        return out
