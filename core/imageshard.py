"""Image shards: webdataset tars as img2dataset writes them, read and written safely.

A shard is `NNNNN.tar` whose members come in groups per sample, adjacent, named
`<key>.<ext>`: one image (`.jpg`/`.jpeg`/`.png`/`.webp`), `.txt` (caption) and `.json`
(metadata: original_width/height, sha256, LAION columns ...). img2dataset writes a
`NNNNN.parquet` (one row per input URL, failures included) and `NNNNN_stats.json` beside it.

Reading is defensive because shards come from the web and from killed jobs:
  * a member whose name is absolute, contains `..`, or is not a regular file is refused
    (recorded in the report, never extracted or followed);
  * a tar that ends mid-member yields every complete sample before the damage and
    records the shard as damaged, instead of raising halfway through a job;
  * samples the shard's parquet lists as downloaded (`status == "success"`) but the tar does
    not hold are listed in the report as `lost`, so every reader accounts for them the same way;
  * a member larger than `max_member_bytes` is refused without being read into memory, a
    compressed tar (gzip, bzip2, xz: a few KB can inflate to terabytes) is refused whole, and
    a key met again later in the tar is listed in `duplicates` (only its first sample is read).
"""
from __future__ import annotations

import io
import json
import os
import tarfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Iterable, Iterator

from core import rundir, storage
from core.storage import AnyPath

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
MAX_MEMBER_BYTES = 256 * 1024 * 1024  # no web image or caption is this large; a bigger member is refused


@dataclass
class Sample:
    key: str  # webdataset key, e.g. "000000042" (shard id + index, as img2dataset makes it)
    image: bytes | None = None
    image_ext: str | None = None
    caption: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)  # the .json member, parsed


@dataclass
class ReadReport:
    """What happened while reading one shard."""

    path: str
    samples: int = 0
    damaged: str | None = None  # why the shard could not be read to the end
    refused: list[tuple[str, str]] = field(default_factory=list)  # (member name, reason)
    bad_members: list[tuple[str, str]] = field(default_factory=list)  # unparsable .json etc.
    lost: list[str] = field(default_factory=list)  # keys the shard's parquet lists as successes, not in the tar
    duplicates: list[str] = field(default_factory=list)  # keys met again after their sample (later copies skipped)

    def lost_reason(self) -> str:
        """The ledger reason of a lost sample."""
        return f"missing from {Path(self.path).name}: {self.damaged or 'not in the tar'}"

    def unread(self) -> list[tuple[str, str, str]]:
        """(key, reason, detail) of everything the shard named but no sample was read for, in
        order: refused members (`refused_member`), later copies of a key (`duplicate_key`),
        samples its parquet lists but the tar lost (`lost_from_tar`). Readers add one `failed`
        ledger row for each, so nothing is dropped silently."""
        return ([(name, "refused_member", why) for name, why in self.refused]
                + [(key, "duplicate_key", "a later copy of a key already read") for key in self.duplicates]
                + [(key, "lost_from_tar", self.lost_reason()) for key in self.lost])


def list_shards(folder: str | os.PathLike) -> list[AnyPath]:
    """The shards of a folder (or a single tar), sorted; local or on an object store.

    A step's output folder (`curate download`, `curate neardup --write-shards`) names its
    shards in its completion record (`_stats.json`: "parts"), or, while unfinished, in its unit
    markers (`_done/*.json`: "files"): they are taken from there, never from a listing (an object
    store lists objects no record has committed yet). Any other folder: its `*.tar` files,
    skipping `_`- and `.`-prefixed names."""
    p = storage.path(folder)
    if p.is_file():
        return [p]
    if not p.is_dir():
        raise FileNotFoundError(f"{p}: no such shard folder or file")
    named = rundir.recorded_files(p, ".tar")
    if named is not None:
        return named
    return sorted((x for x in p.glob("*.tar") if not x.name.startswith(("_", "."))), key=str)


_COMPRESSED_MAGIC = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00")


def _refusal(member: tarfile.TarInfo) -> str | None:
    name = member.name
    if name.startswith("/") or PurePosixPath(name).is_absolute():
        return "absolute path"
    if ".." in PurePosixPath(name).parts:
        return "path traversal (..)"
    if not member.isfile():
        return "not a regular file"
    return None


def _split(name: str) -> tuple[str, str]:
    """`dir/000001.jpg` -> ("dir/000001", "jpg"); the key is up to the first dot of the basename."""
    path = PurePosixPath(name)
    stem, _, ext = path.name.partition(".")
    key = str(path.parent / stem) if str(path.parent) != "." else stem
    return key, ext.lower()


def iter_shard(path: str | os.PathLike, report: ReadReport | None = None,
               max_member_bytes: int = MAX_MEMBER_BYTES) -> Iterator[Sample]:
    """Yield the samples of one tar in order, each key once; damage, refusals, duplicates and
    lost samples go to `report` (`lost` is filled once the last sample has been yielded)."""
    report = report if report is not None else ReadReport(str(path))
    seen: set[str] = set()
    for sample in _read_tar(path, report, max_member_bytes):
        if sample.key in seen:
            report.duplicates.append(sample.key)
            continue
        seen.add(sample.key)
        yield sample
    report.lost = lost_keys(path, seen)


def lost_keys(path: str | os.PathLike, seen: set[str]) -> list[str]:
    """Keys img2dataset's parquet beside the tar lists as successes that are not in `seen`."""
    meta = storage.path(path).with_suffix(".parquet")
    if not meta.is_file():
        return []
    try:
        table = storage.read_parquet(meta, columns=["key", "status"])
    except (OSError, KeyError, ValueError):  # not img2dataset's parquet: nothing to compare with
        return []
    pairs = zip(table.column("key").to_pylist(), table.column("status").to_pylist())
    return [str(k) for k, s in pairs if s == "success" and str(k) not in seen]


def compression(path: str | os.PathLike) -> str | None:
    """"gzip", "bzip2" or "xz" when the file is a compressed stream, else None."""
    head = storage.read_at(path, 0, 6)
    for magic, name in zip(_COMPRESSED_MAGIC, ("gzip", "bzip2", "xz")):
        if head.startswith(magic):
            return name
    return None


def _read_tar(path: str | os.PathLike, report: ReadReport, max_member_bytes: int) -> Iterator[Sample]:
    """Samples as runs of members with one key. A member of a kind the current sample already
    has (a second image, caption or json: `a.png a.txt a.png`, or `c.jpg c.png`) starts another
    sample with the same key, which `iter_shard` then records as a duplicate key: overwriting
    the first would drop a picture without a trace."""
    current: Sample | None = None
    kinds: set[str] = set()  # member kinds the current sample has: image, txt, json
    packed = compression(path)
    if packed:
        report.damaged = f"a {packed}-compressed tar is not accepted (webdataset shards are plain tars)"
        return
    try:
        with storage.open_stream(path) as f, tarfile.open(fileobj=f, mode="r|") as tar:
            for member in tar:
                reason = _refusal(member) or _too_big(member, max_member_bytes)
                if reason:
                    report.refused.append((member.name, reason))
                    continue
                key, ext = _split(member.name)
                data = tar.extractfile(member).read()  # type: ignore[union-attr]
                kind = _kind(ext)
                if current is not None and (key != current.key or kind in kinds):
                    report.samples += 1
                    yield current
                    current = None
                if current is None:
                    current, kinds = Sample(key), set()
                kinds.add(kind)
                _attach(current, ext, data, member.name, report)
            _check_end_marker(path, tar.offset)
    except (tarfile.TarError, EOFError, OSError, zlib_error()) as exc:
        report.damaged = f"{type(exc).__name__}: {exc}"
        # The last sample may be incomplete (its image member cut off): keep it only if whole.
        if current is not None and current.image is None:
            current = None
    if current is not None:
        report.samples += 1
        yield current


def _too_big(member: tarfile.TarInfo, limit: int) -> str | None:
    return f"{member.size} bytes, over the {limit}-byte cap" if member.size > limit else None


def read_samples(path: str | os.PathLike, keys: set[str]) -> dict[str, Sample]:
    """The samples named by `keys` from one shard, reading member headers and seeking past every
    other member's data, so a few samples of a 10,000-sample shard cost its headers, not its
    gigabytes. The same members as `iter_shard` are refused; a damaged tar gives what lies
    before the damage; keys the shard lacks are simply absent from the result."""
    found: dict[str, Sample] = {}
    kinds: dict[str, set[str]] = {}  # member kinds each found sample has
    closed: set[str] = set()  # keys whose first sample has ended: later members are another copy
    report = ReadReport(str(path))
    if compression(path):
        return found  # refused whole, as iter_shard refuses it
    try:
        with tarfile.open(path, mode="r:") as tar:  # random access: TarFile.next() seeks header to header
            for member in tar:
                key, ext = _split(member.name)
                if key not in keys:
                    if len(found) == len(keys):
                        break  # a sample's members are adjacent: every wanted one is complete
                    continue
                kind = _kind(ext)
                if kind in kinds.setdefault(key, set()):
                    closed.add(key)  # as iter_shard: the first sample of a key is the one read
                if key in closed:
                    continue
                kinds[key].add(kind)
                if _refusal(member) is None and _too_big(member, MAX_MEMBER_BYTES) is None:
                    data = tar.extractfile(member).read()  # type: ignore[union-attr]
                    _attach(found.setdefault(key, Sample(key)), ext, data, member.name, report)
    except (tarfile.TarError, EOFError, OSError, zlib_error()):
        pass  # what was read before the damage stands; `iter_shard` is the reader that reports it
    return {k: s for k, s in found.items() if s.image is not None or s.meta or s.caption is not None}




def _check_end_marker(path: str | os.PathLike, offset: int) -> None:
    """An uncompressed tar cut exactly at a member boundary reads as a clean end in stream mode;
    a complete one has two zero blocks (the end-of-archive marker) where the next header would be."""
    end = storage.read_at(path, offset, 2 * tarfile.BLOCKSIZE)
    if len(end) < 2 * tarfile.BLOCKSIZE or end.strip(b"\0"):
        raise tarfile.ReadError(f"no end-of-archive marker at byte {offset}: the tar was cut short")


def zlib_error() -> type[BaseException]:
    import zlib

    return zlib.error


def _kind(ext: str) -> str:
    """What a member adds to its sample: "image" for any image extension, else the extension."""
    return "image" if ext in IMAGE_EXTS else ext


def _attach(sample: Sample, ext: str, data: bytes, name: str, report: ReadReport) -> None:
    if ext in IMAGE_EXTS:
        sample.image, sample.image_ext = data, ext
    elif ext == "txt":
        try:
            sample.caption = data.decode("utf-8")
        except UnicodeDecodeError as exc:  # kept, repaired, and said: the sample is still usable
            sample.caption = data.decode("utf-8", errors="replace")
            report.bad_members.append((name, f"caption is not valid UTF-8 (byte {exc.start}); "
                                             "undecodable bytes read as U+FFFD"))
    elif ext == "json":
        try:
            meta = json.loads(data)
        except ValueError as exc:
            report.bad_members.append((name, f"invalid json: {exc}"))
            return
        if isinstance(meta, dict):
            sample.meta = meta
        else:  # e.g. [1, 2, 3]: the readers look keys up in it
            report.bad_members.append((name, f"json is a {type(meta).__name__}, not an object"))


def write_shard(path: str | os.PathLike, samples: Iterable[Sample]) -> int:
    """Write samples as a webdataset tar (atomically); returns the sample count.

    Members are `<key>.<image_ext>`, `<key>.txt`, `<key>.json`, as img2dataset writes them."""
    from core import atomic

    n = 0
    with atomic.atomic_path(path) as tmp, tarfile.open(tmp, "w") as tar:
        for s in samples:
            members = []
            if s.image is not None:
                members.append((f"{s.key}.{s.image_ext or 'jpg'}", s.image))
            if s.caption is not None:
                members.append((f"{s.key}.txt", s.caption.encode()))
            members.append((f"{s.key}.json", json.dumps(s.meta, default=str).encode()))
            for name, data in members:
                info = tarfile.TarInfo(name)
                info.size, info.mode, info.mtime = len(data), 0o644, 0
                tar.addfile(info, io.BytesIO(data))
            n += 1
    return n
