"""Run/output folders: what defines them, one run at a time, per-unit completion markers.

Layout of any step's output folder OUT:
    OUT/*.parquet | *.tar | *.arrow   the data, at the top level (readers glob it)
    OUT/_config.yaml                  the folder's identity (settings + input) and its hash,
                                      written before any work
    OUT/_done/<unit>.json             completion marker, written after the unit's data is renamed
    OUT/_failed/<unit>.json           why a unit failed in the last run (removed when it succeeds)
    OUT/_stats.json                   the completion record: written last, once every unit is
                                      done and the ledger reconciles; a folder without it is unfinished
    OUT/_lock                         held (flock) by the run writing the folder
Everything that is not data starts with `_`, so readers that glob `OUT/*.parquet` skip it.

One rule for what defines a folder (`identity`): the step, its config's settings (every field
but those marked `core.config.execution`: threads, memory, actors, batch sizes, addresses)
and a fingerprint of its input (`fingerprint`: the upstream step's completion record, or the
input files' names and sizes). Reopening a folder with another identity is refused, naming
what differs; a step whose units read one input shard each also records each unit's input in
its marker (`core.units`), so a redone upstream shard is redone downstream, never reused.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Callable, Iterable, Mapping

import yaml

from core import atomic, storage
from core.config import ConfigError, config_hash, settings, to_dict
from core.errors import UserError
from core.storage import AnyPath, RemotePath

CONFIG, STATS, LOCK, DONE, FAILED = "_config.yaml", "_stats.json", "_lock", "_done", "_failed"


class ConfigMismatchError(ConfigError):
    """The output folder was made by a run with a different config or input."""


class FolderBusyError(UserError):
    """Another live run holds the output folder (see also core.lease.LeaseBusyError)."""


_LOCKS: dict[str, IO[str]] = {}  # folder -> the open lock file this process holds


@dataclass(frozen=True)
class RunDir:
    path: AnyPath  # an absolute local Path or a RemotePath (core.storage)
    step: str
    hash: str

    @classmethod
    def open(cls, path: str | os.PathLike, step: str, identity: Any,
             inputs: Iterable[str | os.PathLike] = (), own_folder: bool = True,
             holds_output: Callable[[AnyPath], bool] | None = None,
             info: Mapping[str, Any] | None = None) -> "RunDir":
        """Create or reopen `path` for `step`, holding its lock for the rest of this process.
        `identity` is everything that determines the output (see `identity()`); a folder made
        with another identity is refused. Leftover temp files of a dead run are removed, only
        once the lock shows no other run is writing here.

        A step deletes data files no marker of its own names (an abandoned attempt's), so with
        `own_folder` an existing folder that holds anything but is no step's output is refused,
        as is a folder that is, or is inside, or holds one of the `inputs` folders.

        A folder that holds no output yet (`holds_output`; by default: no `_done` marker and no
        `_stats.json`, for a step's own folder) takes new settings instead of refusing them: a
        run that failed before its first unit leaves nothing to protect. `info` is recorded in
        `_config.yaml` beside the identity, outside its hash (e.g. a training run's step target)."""
        path = storage.path(path)
        if own_folder:
            _check_own(path, step, inputs)
        try:
            path.mkdir(parents=True, exist_ok=True)
            hold_lock(path)
        except (FileExistsError, NotADirectoryError):
            raise UserError(f"{path}: cannot be an output folder: it, or a folder above it, is a file") from None
        except PermissionError as exc:
            raise UserError(f"{path}: cannot write the output folder ({exc.strerror}: {exc.filename})") from None
        resolved = to_dict(identity)
        digest = config_hash({"step": step, "config": resolved})
        cfg_file = path / CONFIG
        old = _read_yaml(cfg_file) if cfg_file.exists() else None
        holds = holds_output or (_holds_output if own_folder else (lambda _: True))
        if old is not None and old.get("hash") != digest and not holds(path):
            # e.g. a run that failed on a bad tokenizer or setting before its first unit: nothing to keep
            print(f"{path}: the earlier run here (other settings) left no output; starting afresh with these "
                  "settings", file=sys.stderr)
            old = None
        if old is not None and old.get("hash") != digest:
            raise ConfigMismatchError(_mismatch_message(path, step, old, resolved))
        record = {"step": step, "hash": digest, "config": resolved, **({"info": dict(info)} if info else {})}
        if old is None or old.get("info") != record.get("info"):
            atomic.write_text(cfg_file, yaml.safe_dump(record, sort_keys=False))
        atomic.remove_temps(path)  # leftovers of a killed run are never valid data
        return cls(path, step, digest)

    def marker(self, task: str) -> AnyPath:
        return self.path / DONE / f"{task}.json"

    def failed_path(self, task: str) -> AnyPath:
        return self.path / FAILED / f"{task}.json"

    def is_done(self, task: str) -> bool:
        return self.marker(task).exists()

    def mark_done(self, task: str, info: Mapping[str, Any] | None = None) -> None:
        """Call only after the task's outputs are renamed into place."""
        atomic.write_json(self.marker(task), dict(info or {}))

    def done_info(self, task: str) -> dict[str, Any]:
        return json.loads(self.marker(task).read_text())

    def read_marker(self, task: str) -> dict[str, Any] | None:
        """The task's marker info; None when there is none or it is unreadable (markers are
        written whole, so a damaged one was damaged from outside: its task is redone)."""
        return read_marker(self.marker(task))

    def done_tasks(self) -> list[str]:
        return sorted(p.stem for p in (self.path / DONE).glob("*.json"))

    def unfinish(self) -> None:
        """Remove the completion record before changing any output: readers then see the
        folder as unfinished until the step writes it again."""
        (self.path / STATS).unlink(missing_ok=True)


def _check_own(path: AnyPath, step: str, inputs: Iterable[str | os.PathLike]) -> None:
    """Refuse an output folder a step must not write into (see RunDir.open)."""
    def real(p: AnyPath) -> str:  # a local path with its links resolved, as a folder prefix
        return (str(p) if isinstance(p, RemotePath) else os.path.realpath(p)).rstrip("/") + "/"

    for spec in inputs:
        glob = re.match(r"[^*?\[]*", str(spec)).group()  # a glob's fixed start
        if glob != str(spec):
            base = storage.path(glob.rpartition("/")[0] or ".")  # the folder it lists
        elif storage.path(spec).is_dir():
            base = storage.path(spec)
        else:
            continue  # a single input file: its folder may hold outputs
        out, inp = real(path), real(base)
        if out.startswith(inp) or inp.startswith(out):
            where = "is" if out == inp else "is inside" if out.startswith(inp) else "holds"
            raise UserError(f"{path}: the output folder {where} the input {base}; "
                            "give an output folder outside the input")
    if (path / CONFIG).is_file() or not path.is_dir():
        return
    # `_` names are bookkeeping (a lock, temp files, outputs a fused step staged here first);
    # no step deletes them, nor reads them as data
    foreign = sorted(p.name for p in path.iterdir() if not p.name.startswith(("_", ".")))
    if foreign:
        raise UserError(f"{path}: exists and holds files ({', '.join(foreign[:3])}{', ...' if len(foreign) > 3 else ''}) "
                        f"but is no step's output folder (no {CONFIG}); `{step}` would delete data files it did not "
                        "write there: give a new or empty folder")


def _holds_output(path: AnyPath) -> bool:
    """A unit finished in this step folder: a `_done` marker or the completion record."""
    return (path / STATS).exists() or any((path / DONE).glob("*.json"))


def read_marker(path: AnyPath) -> dict[str, Any] | None:
    """A `_done/<unit>.json` marker; None when missing, unreadable or not a JSON object."""
    try:
        info = json.loads(path.read_text())
    except (FileNotFoundError, ValueError, UnicodeDecodeError):
        return None
    return info if isinstance(info, dict) else None


def folder_step(folder: AnyPath) -> str | None:
    """The step whose output `folder` is (its `_config.yaml`), or None."""
    cfg = folder / CONFIG
    return _read_yaml(cfg).get("step") if cfg.is_file() else None


def read_stats(folder: AnyPath) -> dict[str, Any]:
    """A step folder's completion record, refused with one line when it is damaged."""
    stats = folder / STATS
    try:
        record = json.loads(stats.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        record = None
        why = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    else:
        why = "not a JSON object"
    if not isinstance(record, dict):
        step = folder_step(folder) or "?"
        raise UserError(f"{stats}: unreadable ({why}); rerun the `{step}` command that wrote {folder}, with the "
                        "same arguments, to write it again")
    return record


def _read_yaml(path: AnyPath) -> dict[str, Any]:
    """A run folder's _config.yaml, read safely (no Python tags: yaml.safe_load)."""
    try:
        return yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not a valid run record ({str(exc).splitlines()[0]})") from exc


def identity(cfg: Any, input_fingerprint: Any, **extra: Any) -> dict[str, Any]:
    """What defines a step's output folder: its settings, its input and anything else that
    decides the bytes it writes (a format version, a library version, a tokenizer hash)."""
    return {"settings": settings(cfg), "input": input_fingerprint, **extra}


# ---------------------------------------------------------------- inputs


def step_record(folder: str | os.PathLike) -> dict[str, Any] | None:
    """What a step's output folder says about itself: {"step", "hash", "input", "complete",
    "done", "failed"}; None when `folder` is not a step's output."""
    folder = storage.path(folder)
    cfg_file = folder / CONFIG
    if not cfg_file.is_file():
        return None
    written = _read_yaml(cfg_file)
    stats = folder / STATS
    return {
        "step": written.get("step"), "hash": written.get("hash"),
        "input": (written.get("config") or {}).get("input"),
        "settings": (written.get("config") or {}).get("settings") or {},
        "complete": stats.is_file(),
        "record": _record_digest(folder) if stats.is_file() else None,
        "done": len(list((folder / DONE).glob("*.json"))),
        "failed": sorted(p.stem for p in (folder / FAILED).glob("*.json")),
    }


def _record_digest(folder: AnyPath) -> str:
    """Digest of a completion record's counts (timings left out: a rerun that changes nothing
    keeps the digest, so the folders made from it stay valid)."""
    record = read_stats(folder)
    kept = {k: v for k, v in record.items() if "second" not in k}
    return hashlib.sha256(json.dumps(kept, sort_keys=True).encode()).hexdigest()[:16]


def check_finished(folder: str | os.PathLike, allow_incomplete: bool = False) -> dict[str, Any] | None:
    """Refuse an input folder that is an unfinished step's output (no completion record),
    naming what is missing; returns its step record (None for a plain folder of files)."""
    record = step_record(folder)
    if record is None or record["complete"] or allow_incomplete:
        return record
    failed = record["failed"]
    detail = f"{record['done']} units done" + (f", {len(failed)} failed (e.g. {failed[0]})" if failed else "")
    raise UserError(
        f"{folder} is the output of an unfinished `{record['step']}` run ({detail}; no {STATS}): "
        f"rerun that step's command to finish it, or pass --allow-incomplete to use what is there"
    )


def recorded_files(folder: str | os.PathLike, suffix: str) -> list[AnyPath] | None:
    """The data files (top-level names ending in `suffix`) a step's output folder names, sorted:
    in its completion record (`_stats.json` "parts"), or, while it is unfinished, in its unit
    markers (`_done/*.json` "files"). Readers take a step's outputs from here, never from a
    listing: an object store lists objects no record has committed (an abandoned attempt).
    None for a folder that is no step's output, or whose records do not name their files (an
    older format): read it by listing."""
    folder = storage.path(folder)
    stats = folder / STATS
    if stats.is_file():
        parts = read_stats(folder).get("parts")
        return None if parts is None else require_present(folder, sorted((folder / n for n in parts if n.endswith(suffix)), key=str))
    if not (folder / CONFIG).is_file():
        return None
    markers = [m for m in map(read_marker, (folder / DONE).glob("*.json")) if m is not None]
    if not any("files" in m for m in markers):
        return None  # no unit of this folder names its files (an older format, or none done yet)
    names = {n for m in markers for n in m.get("files", ())}
    return require_present(folder, sorted((folder / n for n in names if n.endswith(suffix) and "/" not in n), key=str))


def require_present(folder: AnyPath, files: list[AnyPath]) -> list[AnyPath]:
    """`files` (top-level data files a step folder's records name), refused with one line if
    any is gone (deleted by hand, lost): the step that wrote the folder redoes them on a rerun
    (core.units). One listing, not a request per file."""
    present = storage.file_sizes(folder)
    missing = [f for f in files if f.name not in present]
    if missing:
        step = folder_step(folder) or "?"
        raise UserError(f"{folder}: {len(missing)} of the {len(files)} files its records name are gone (first: "
                        f"{missing[0].name}); rerun the `{step}` command that wrote it, with the same arguments, "
                        "to redo them")
    return files


def fingerprint(folder: str | os.PathLike, files: Iterable[str | os.PathLike]) -> dict[str, Any]:
    """The input's identity: an upstream step's folder by its identity and completion record
    (its own content is pinned by its markers), any other input by its files' paths and sizes."""
    record = step_record(folder)
    if record is not None and record["complete"]:
        return {"step": record["step"], "hash": record["hash"], "record": record["record"],
                "path": str(storage.path(folder))}
    return files_fingerprint(files)


def location(folder: str | os.PathLike) -> dict[str, str]:
    """The input of a step whose units each record their own input file (`file_identity`):
    where it is; what it holds is checked unit by unit."""
    return {"path": str(storage.path(folder))}


def files_fingerprint(files: Iterable[str | os.PathLike]) -> dict[str, Any]:
    """Count and digest of (absolute path, size) of `files`."""
    items = sorted((str(p), p.stat().st_size) for p in map(storage.path, files))
    digest = hashlib.sha256("\n".join(f"{p}\t{n}" for p, n in items).encode()).hexdigest()
    return {"files": len(items), "bytes": sum(n for _, n in items), "digest": digest[:16]}


def file_identity(path: str | os.PathLike) -> dict[str, Any]:
    """One input file's identity for a unit marker: name, size and modification time."""
    p = storage.path(path)
    st = p.stat()
    return {"name": p.name, "size": st.st_size, "mtime_ns": st.st_mtime_ns}


# ---------------------------------------------------------------- one run at a time


def hold_lock(folder: AnyPath) -> int | None:
    """Take `folder`'s lock for the rest of this process (a second call is a no-op) and return
    its file descriptor (a child process given it holds the lock too). The OS releases an
    flock when its last holder dies, so a crash never leaves a stale lock. An object-store
    folder has no flock: it gets a lease (`core.lease`), renewed while this process lives."""
    if isinstance(folder, RemotePath):
        from core import lease

        lease.hold(folder / LOCK)
        return None
    key = os.path.realpath(folder)  # one lock per folder, however it is reached
    held = _LOCKS.get(key)
    if held is not None and _same_file(held, folder / LOCK):
        return held.fileno()
    f = open(folder / LOCK, "a+")  # noqa: SIM115 - held open on purpose
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "unknown"
        f.close()
        raise FolderBusyError(f"{folder}: another run is writing this folder ({holder}); "
                              "wait for it to finish or stop it, then rerun") from None
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()} on {os.uname().nodename}\n")
    f.flush()
    _LOCKS[key] = f
    return f.fileno()


def _same_file(f: IO[str], path: Path) -> bool:
    """The held lock is still the folder's lock file (the folder was not moved or remade)."""
    try:
        return os.fstat(f.fileno()).st_ino == path.stat().st_ino
    except OSError:
        return False


def release_lock(folder: str | os.PathLike) -> None:
    """Give a folder's lock back before this process ends (tests, long-lived drivers)."""
    folder = storage.path(folder)
    if isinstance(folder, RemotePath):
        from core import lease

        lease.release(folder / LOCK)
        return
    f = _LOCKS.pop(os.path.realpath(folder), None)
    if f is not None:
        with contextlib.suppress(OSError):
            fcntl.flock(f, fcntl.LOCK_UN)
        f.close()


def _mismatch_message(path: AnyPath, step: str, old: dict, new: dict) -> str:
    old_cfg = _flatten(old.get("config") or {})
    new_cfg = _flatten(new)
    diffs = [
        f"  {k}: {old_cfg.get(k)!r} -> {new_cfg.get(k)!r}"
        for k in sorted(set(old_cfg) | set(new_cfg))
        if old_cfg.get(k) != new_cfg.get(k)
    ]
    if old.get("step") != step:
        diffs.insert(0, f"  step: {old.get('step')!r} -> {step!r}")
    what = "input" if diffs and all(d.strip().startswith("input.") for d in diffs) else "config"
    return (
        f"{path} holds the output of a run with a different {what}; refusing to mix outputs.\n"
        + "\n".join(diffs[:20])
        + "\nUse a new output folder, or delete this one to start over."
    )


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out
