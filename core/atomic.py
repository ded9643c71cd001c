"""Crash-safe file writes: a reader sees the old file or the complete new one, never half.

Local disk: data goes to a temp name in the same folder, then `os.replace`; temp names start
with `_tmp.` so folder readers skip them, and a killed run's leftovers are removed by
`remove_temps`. Object store (core.storage.RemotePath): the file is written to a local temp
file and uploaded in one go; the object appears only when the upload completes.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from core import storage


def temp_name(path: Path) -> Path:
    """A unique sibling of `path` that readers skip (leading `_`)."""
    return path.with_name(f"_tmp.{uuid.uuid4().hex[:12]}.{path.name}")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a local temp path to write; on success it becomes `path` (rename, or one upload
    to an object store), on error it is removed."""
    if storage.is_remote(path):
        with _uploading(storage.path(path)) as tmp:
            yield tmp
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(path)
    try:
        yield tmp
        if tmp.exists():
            _fsync(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


@contextlib.contextmanager
def _uploading(dest: "storage.RemotePath") -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="tessera-") as folder:
        tmp = Path(folder) / dest.name
        yield tmp
        if tmp.exists():
            storage.upload(tmp, dest)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def file_in_the_way(path: str | os.PathLike) -> Path | None:
    """The file at or above local `path` that stops a folder or file being written there (a
    command checks this before minutes of work, not at its final rename); None when none does."""
    path = Path(path).absolute()
    above = next((p for p in (path, *path.parents) if p.exists()), None)
    return above if above is not None and above != path and not above.is_dir() else None


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text(path: str | os.PathLike, text: str) -> None:
    write_bytes(path, text.encode())


def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def write_parquet(path: str | os.PathLike, table: pa.Table) -> None:
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def publish(local: Path, dest: str | os.PathLike) -> None:
    """Commit a finished local file as `dest` and remove the local one: a rename on the same
    disk, a copy to a temp name then a rename across disks, one upload to an object store."""
    if storage.is_remote(dest):
        storage.upload(local, storage.path(dest))
        local.unlink()
        return
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(local, dest)
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
        with atomic_path(dest) as tmp:
            shutil.copyfile(local, tmp)
        local.unlink()


def remove_temps(folder: str | os.PathLike) -> int:
    """Delete `_tmp.*` leftovers of a killed run in a local `folder` (recursively); returns how
    many. (An object store never holds a temp object: uploads are all or nothing.)"""
    if storage.is_remote(folder):
        return 0
    n = 0
    for p in Path(folder).rglob("_tmp.*"):
        if p.is_file():
            p.unlink()
            n += 1
    return n
