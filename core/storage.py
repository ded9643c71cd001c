"""Storage: inputs and outputs as local paths or object-store URIs, one API for both.

Every step's inputs and outputs may be a local path, `file://`, `s3://` or `gs://`. `path(x)`
turns what the user gave into one of two types with the same small, pathlib-like surface:
  * a local path -> an absolute `pathlib.Path` (made absolute on the driver, before any task
    starts, so a task on another node never resolves it against its own working directory);
  * `s3://bucket/key`, `gs://bucket/key` -> a `RemotePath` over pyarrow's built-in
    filesystems (endpoint, credentials and region from the standard variables:
    AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION; GCS's own).
Both support `/`, `name`, `stem`, `suffix`, `parent`, `exists`, `is_file`, `is_dir`, `stat`,
`read_bytes`, `read_text`, `iterdir`, `glob`, `unlink`, `mkdir`, and `str()` (the URI).

Writing goes through `core.atomic` (`atomic_path`, `write_bytes`, ...), which commits a file
whole or not at all: on a local disk through a temp name and a rename; on an object store by
one upload (an object becomes visible only when its upload completes: a reader sees the old
object or the whole new one). An object store has no rename, so an output of several files is
committed by the completion record that names them (a unit's marker, a step's _stats.json, a
code manifest): readers trust records and manifests, never listings.

Libraries that need a local file (duckdb, tarfile, PIL) get one from `local_copy` (a no-op for
a local path; a download to a temp file for a remote one).
"""
from __future__ import annotations

import contextlib
import fnmatch
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Iterator, Union

import pyarrow as pa
import pyarrow.fs as pafs

SCHEMES = ("s3", "gs", "gcs")


def is_remote(p: object) -> bool:
    return isinstance(p, RemotePath) or (isinstance(p, str) and p.split("://", 1)[0] in SCHEMES and "://" in p)


def path(p: "str | os.PathLike | RemotePath") -> "AnyPath":
    """A user's path or URI as an absolute local Path or a RemotePath."""
    if isinstance(p, RemotePath):
        return p
    text = os.fspath(p)
    if text.startswith("file://"):
        return Path(text[len("file://"):]).absolute()
    if is_remote(text):
        scheme, rest = text.split("://", 1)
        return RemotePath("gs" if scheme == "gcs" else scheme, rest.strip("/"))
    return Path(text).absolute()


@dataclass(frozen=True)
class _Stat:
    st_size: int
    st_mtime: float
    st_mtime_ns: int


@dataclass(frozen=True)
class RemotePath:
    """`scheme://bucket/key` on an object store, with the pathlib methods the steps use."""

    scheme: str  # "s3" | "gs"
    key: str  # "bucket/some/key" (no leading or trailing slash)

    # -- naming
    def __str__(self) -> str:
        return f"{self.scheme}://{self.key}"

    def __fspath__(self) -> str:  # os.fspath() gives the URI; only storage-aware code may use it
        return str(self)

    def __truediv__(self, part: str | os.PathLike) -> "RemotePath":
        return RemotePath(self.scheme, f"{self.key}/{os.fspath(part).strip('/')}")

    @property
    def name(self) -> str:
        return PurePosixPath(self.key).name

    @property
    def stem(self) -> str:
        return PurePosixPath(self.key).stem

    @property
    def suffix(self) -> str:
        return PurePosixPath(self.key).suffix

    @property
    def parent(self) -> "RemotePath":
        return RemotePath(self.scheme, str(PurePosixPath(self.key).parent))

    def with_suffix(self, suffix: str) -> "RemotePath":
        return RemotePath(self.scheme, str(PurePosixPath(self.key).with_suffix(suffix)))

    def with_name(self, name: str) -> "RemotePath":
        return RemotePath(self.scheme, str(PurePosixPath(self.key).with_name(name)))

    def relative_to(self, other: "RemotePath") -> PurePosixPath:
        return PurePosixPath(self.key).relative_to(other.key)

    def absolute(self) -> "RemotePath":
        return self

    def resolve(self) -> "RemotePath":
        return self

    # -- reading
    @property
    def fs(self) -> pafs.FileSystem:
        return filesystem(self.scheme)

    def _info(self) -> pafs.FileInfo:
        return self.fs.get_file_info(self.key)

    def exists(self) -> bool:
        return self._info().type != pafs.FileType.NotFound

    def is_file(self) -> bool:
        return self._info().type == pafs.FileType.File

    def is_dir(self) -> bool:
        return self._info().type == pafs.FileType.Directory

    def stat(self) -> _Stat:
        info = self._info()
        if info.type == pafs.FileType.NotFound:
            raise FileNotFoundError(str(self))
        mtime_ns = info.mtime_ns or 0
        return _Stat(info.size or 0, mtime_ns / 1e9, mtime_ns)

    def read_bytes(self) -> bytes:
        try:
            with self.fs.open_input_stream(self.key) as f:
                return f.read()
        except FileNotFoundError:
            raise
        except OSError as exc:
            if not self.exists():
                raise FileNotFoundError(str(self)) from exc
            raise

    def read_text(self, encoding: str = "utf-8") -> str:
        return self.read_bytes().decode(encoding)

    def open(self, mode: str = "rb"):  # noqa: ANN201 - a pyarrow NativeFile (seekable)
        if mode != "rb":
            raise ValueError("RemotePath.open reads only ('rb'); write through core.atomic")
        return self.fs.open_input_file(self.key)

    def iterdir(self) -> Iterator["RemotePath"]:
        selector = pafs.FileSelector(self.key, allow_not_found=True, recursive=False)
        for info in self.fs.get_file_info(selector):
            yield RemotePath(self.scheme, info.path.strip("/"))

    def glob(self, pattern: str) -> Iterator["RemotePath"]:
        """`*.parquet`, `_done/*.json` or `**/*.parquet` (fnmatch on the path below this one)."""
        recursive = "**" in pattern or "/" in pattern
        selector = pafs.FileSelector(self.key, allow_not_found=True, recursive=recursive)
        for info in self.fs.get_file_info(selector):
            rel = info.path.strip("/")[len(self.key) + 1:]
            if fnmatch.fnmatchcase(rel, pattern) or (pattern.startswith("**/") and fnmatch.fnmatchcase(rel, pattern[3:])):
                yield RemotePath(self.scheme, info.path.strip("/"))

    def rglob(self, pattern: str) -> Iterator["RemotePath"]:
        return self.glob(f"**/{pattern}")

    # -- changing (whole objects; writes go through core.atomic)
    def mkdir(self, parents: bool = False, exist_ok: bool = False) -> None:
        pass  # an object store has no folders: a key's prefix exists once an object is under it

    def unlink(self, missing_ok: bool = False) -> None:
        try:
            self.fs.delete_file(self.key)
        except (FileNotFoundError, OSError):
            if not missing_ok and not self.exists():
                raise FileNotFoundError(str(self)) from None


AnyPath = Union[Path, RemotePath]


_FILESYSTEMS: dict[str, pafs.FileSystem] = {}


def filesystem(scheme: str) -> pafs.FileSystem:
    """The pyarrow filesystem of a scheme, made once per process from the environment."""
    if scheme not in _FILESYSTEMS:
        if scheme == "s3":
            _FILESYSTEMS[scheme] = pafs.S3FileSystem(**s3_options(os.environ))
        elif scheme == "gs":
            _FILESYSTEMS[scheme] = pafs.GcsFileSystem()
        else:
            raise ValueError(f"unsupported storage scheme {scheme!r} (use a local path, file://, s3:// or gs://)")
    return _FILESYSTEMS[scheme]


def s3_options(env: "os._Environ[str] | dict[str, str]") -> dict[str, str]:
    """S3FileSystem arguments from the standard variables: AWS_ENDPOINT_URL (an S3 API other
    than AWS's: MinIO, Ceph, moto), AWS_REGION / AWS_DEFAULT_REGION. Credentials are found by
    the AWS SDK itself (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, profiles, instance roles)."""
    out: dict[str, str] = {}
    endpoint = env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL")
    if endpoint:
        scheme, _, host = endpoint.rpartition("://")
        out.update(endpoint_override=host.rstrip("/"), scheme=scheme or "https")
    region = env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION")
    if region:
        out["region"] = region
    return out


def arrow_fs(p: AnyPath) -> tuple[pafs.FileSystem, str]:
    """(pyarrow filesystem, path in it) of a path: for pyarrow.parquet / pyarrow.dataset."""
    if isinstance(p, RemotePath):
        return p.fs, p.key
    return pafs.LocalFileSystem(), str(p)


def read_parquet(p: "str | os.PathLike | RemotePath", columns: list[str] | None = None,
                 filters: list | None = None) -> "pa.Table":
    """A parquet file (local or on an object store) as a table; `filters` skip row groups by
    their statistics, as pyarrow.parquet.read_table does."""
    import pyarrow.parquet as pq

    fs, key = arrow_fs(path(p))
    return pq.read_table(key, filesystem=fs, columns=columns, filters=filters)


@contextlib.contextmanager
def parquet_file(p: "str | os.PathLike | RemotePath") -> Iterator:  # yields a pyarrow.parquet.ParquetFile
    """A parquet file's reader (footer, row groups, random access) on any store, closed after."""
    import pyarrow.parquet as pq

    fs, key = arrow_fs(path(p))
    with fs.open_input_file(key) as f:
        yield pq.ParquetFile(f)


STREAM_BUFFER = 8 << 20  # bytes per read from an object store: one ranged GET per 8 MiB, not per tar block


@contextlib.contextmanager
def open_stream(p: "str | os.PathLike | RemotePath") -> Iterator:  # yields a binary file object
    """A file read front to back (a tar streamed without a local copy): a local file, or an
    object read in STREAM_BUFFER-sized ranged requests."""
    p = path(p)
    if isinstance(p, RemotePath):
        with p.fs.open_input_stream(p.key, buffer_size=STREAM_BUFFER) as f:
            yield f
        return
    with open(p, "rb") as f:
        yield f


def read_at(p: "str | os.PathLike | RemotePath", offset: int, length: int) -> bytes:
    """Up to `length` bytes of a file from byte `offset` (fewer at its end; one ranged request
    on an object store). `read_range` is the same read when exactly `length` bytes must be there."""
    return read_range(path(p), offset, length, exact=False)


def attempt_path(p: AnyPath, attempt: str) -> AnyPath:
    """Where one attempt of a task writes its output `p`. On a local disk `p` itself: the
    rename that commits it replaces any earlier attempt's file whole. On an object store, with
    no rename, `<stem>.<attempt><suffix>`: attempts never overwrite each other, the completion
    record (the task's marker) names the one that counts, and the others are deleted when the
    step finishes."""
    if isinstance(p, RemotePath):
        return p.with_name(f"{p.stem}.{attempt}{p.suffix}")
    return p


def rmtree(p: AnyPath) -> None:
    """Remove a folder (a key prefix) and everything under it; nothing if it is absent."""
    if isinstance(p, RemotePath):
        with contextlib.suppress(FileNotFoundError, OSError):
            p.fs.delete_dir(p.key)
        return
    shutil.rmtree(p, ignore_errors=True)


def upload(local: Path, dest: AnyPath) -> None:
    """Copy a local file to `dest` (an object appears whole when the upload completes)."""
    if isinstance(dest, RemotePath):
        pafs.copy_files(str(local), dest.key, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=dest.fs)
    else:
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(local, dest)


@contextlib.contextmanager
def local_copy(p: AnyPath) -> Iterator[Path]:
    """A local file with `p`'s content, for libraries that read local files only (tarfile, duckdb);
    a local path is yielded as it is, a remote one is downloaded to a temp file removed after."""
    if not isinstance(p, RemotePath):
        yield Path(p)
        return
    with tempfile.TemporaryDirectory(prefix="tessera-") as tmp:
        target = Path(tmp) / p.name
        pafs.copy_files(p.key, str(target), source_filesystem=p.fs, destination_filesystem=pafs.LocalFileSystem())
        yield target


# ---------------------------------------------------------------- finding, moving, reading ranges

_WILDCARDS = "*?["


def expand(spec: "str | os.PathLike | RemotePath", suffix: str = "") -> list[AnyPath]:
    """The files of `spec` whose names end in `suffix`, sorted by path: a file, a folder
    (searched recursively) or a glob (`*`, `?`, `[...]`; `**/` for any depth), local or on an
    object store. Names starting with `_` or `.` (bookkeeping, temp and hidden files, as in
    Spark and Hive) are skipped below a folder, and as file names of a glob. Raises
    FileNotFoundError when `spec` names nothing that exists."""
    text = str(spec) if isinstance(spec, RemotePath) else os.fspath(spec)
    if any(ch in text for ch in _WILDCARDS):
        files = [p for p in _glob(text) if is_data_name(p.name) and p.name.endswith(suffix)]
    else:
        p = path(text)
        if p.is_file():
            return [p]
        if not p.is_dir():
            raise FileNotFoundError(text)
        files = [f for f in _walk(p) if f.name.endswith(suffix)]
    return sorted(files, key=str)


def file_sizes(folder: AnyPath) -> dict[str, int]:
    """Name -> size of each file directly in `folder` ({} when there is none): one listing (on
    an object store one LIST request per 1,000 names, not a request per file)."""
    if isinstance(folder, RemotePath):
        selector = pafs.FileSelector(folder.key, allow_not_found=True, recursive=False)
        return {i.base_name: i.size for i in folder.fs.get_file_info(selector) if i.type == pafs.FileType.File}
    try:
        with os.scandir(folder) as entries:
            return {e.name: e.stat().st_size for e in entries if e.is_file()}
    except (FileNotFoundError, NotADirectoryError):
        return {}


def sizes_of(paths: "list[AnyPath]") -> "list[int | None]":
    """The size of each of `paths` (None where there is no such file): one stat or HEAD each."""
    out: "list[int | None]" = []
    for p in paths:
        if isinstance(p, RemotePath):
            info = p._info()
            out.append(info.size if info.type == pafs.FileType.File else None)
        else:
            try:
                out.append(os.stat(p).st_size)
            except (FileNotFoundError, NotADirectoryError):
                out.append(None)
    return out


def is_data_name(name: str) -> bool:
    """Data, not bookkeeping (`_stats.json`, `_tmp.*`, `_ledger/`) or hidden (`.x`)."""
    return not name.startswith(("_", "."))


def _walk(folder: AnyPath) -> Iterator[AnyPath]:
    if isinstance(folder, RemotePath):  # one recursive listing; skip names below `_`/`.` folders
        selector = pafs.FileSelector(folder.key, allow_not_found=True, recursive=True)
        for info in folder.fs.get_file_info(selector):
            rel = info.path.strip("/")[len(folder.key) + 1:]
            if info.type == pafs.FileType.File and all(is_data_name(part) for part in rel.split("/")):
                yield RemotePath(folder.scheme, info.path.strip("/"))
        return
    for entry in sorted(folder.iterdir()):
        if not is_data_name(entry.name):
            continue
        if entry.is_dir():
            yield from _walk(entry)
        elif entry.is_file():
            yield entry


def _glob(pattern: str) -> list[AnyPath]:
    if not is_remote(pattern):
        import glob as globlib

        local = pattern[len("file://"):] if pattern.startswith("file://") else pattern
        return [Path(p).absolute() for p in globlib.glob(local, recursive=True) if Path(p).is_file()]
    scheme, rest = pattern.split("://", 1)
    parts = rest.strip("/").split("/")
    fixed = next(i for i, part in enumerate(parts) if any(ch in part for ch in _WILDCARDS))
    base = RemotePath("gs" if scheme == "gcs" else scheme, "/".join(parts[:fixed]))
    regex = glob_regex("/".join(parts[fixed:]))
    selector = pafs.FileSelector(base.key, allow_not_found=True, recursive=True)
    return [RemotePath(base.scheme, info.path.strip("/")) for info in base.fs.get_file_info(selector)
            if info.type == pafs.FileType.File and regex.match(info.path.strip("/")[len(base.key) + 1:])]


def glob_regex(pattern: str) -> "re.Pattern[str]":
    """A compiled regex of a path glob as the shell reads it: `*` and `?` stay within one
    folder, `**/` matches any number of folders, `[...]` (`[!...]`) a set of characters."""
    import re

    out, i = [], 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] in "*?":
            out.append("[^/]*" if pattern[i] == "*" else "[^/]")
            i += 1
        elif pattern[i] == "[" and "]" in pattern[i + 1:]:
            j = pattern.index("]", i + 1)
            body = pattern[i + 1:j]
            out.append("[" + ("^" + body[1:] if body.startswith("!") else body).replace("\\", "\\\\") + "]")
            i = j + 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return re.compile("".join(out) + r"\Z")


def move(src: AnyPath, dest: AnyPath) -> None:
    """Move a file within one store: a rename on a local disk; on an object store a server-side
    copy then a delete (`dest` appears whole; commit it with a record that names it)."""
    if isinstance(src, RemotePath) != isinstance(dest, RemotePath):
        raise ValueError(f"cannot move between stores: {src} -> {dest}")
    if isinstance(src, RemotePath):
        src.fs.move(src.key, dest.key)
        return
    dest.parent.mkdir(parents=True, exist_ok=True)
    os.replace(src, dest)


def read_range(p: AnyPath, offset: int, length: int, exact: bool = True) -> bytes:
    """`length` bytes of a file from byte `offset` (one ranged GET on an object store);
    exact=False allows fewer at the file's end (none past it)."""
    fs, key = arrow_fs(p)
    with fs.open_input_file(key) as f:
        data = f.read_at(length, offset) if offset < f.size() else b""
    if exact and len(data) != length:
        raise OSError(f"{p}: expected {length} bytes at offset {offset}, read {len(data)} (file truncated?)")
    return data
