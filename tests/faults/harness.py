"""Fault injection: run a real command, kill it at random points, rerun it, compare.

    cmd = Command("neardup", argv, out, units=..., finished=...)
    record = chain_of_kills(cmd, kills=5, rng=random.Random(0))   # SIGKILL the driver 5 times
    run_to_end(cmd)                                               # the same command, once more
    assert snapshot(out) == snapshot(reference_out)

A kill lands at a random moment between the command's first and last unit (the trigger is a
random count of completion markers plus a random delay), and only the driver is killed, as an
OOM kill or a preempted node would: everything it started must die with it (core.procs) and the
rerun must finish the job with nothing lost and nothing doubled. Each record says whether the
kill landed mid-run (the process still running, its completion record absent, a unit more done).

While a command runs, a `PartialReader` thread keeps opening every data file visible in its
output folders (names not starting with `_` or `.`): parquet read whole, tars to the end, Arrow
files by memory map. A reader may never see a partial file.

bench/faults.py runs the same harness on larger inputs with more kill points.
"""
from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import psutil

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def env() -> dict[str, str]:
    """The environment of a command run by a test: a local Ray of its own (no RAY_ADDRESS)."""
    out = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    out.update(HF_HUB_OFFLINE="1", NO_ALBUMENTATIONS_UPDATE="1", PYTHONUNBUFFERED="1")
    return out


@dataclass
class Command:
    name: str
    argv: list[str]  # the full command line
    folders: list[Path]  # output folders to watch (units, completion records, visible files)
    units: Callable[[], tuple[int, int]]  # (units done, units in all) from the markers
    finished: Callable[[], bool]  # every completion record is written
    timeout: float = 600.0


@dataclass
class KillRecord:
    command: str
    done: int  # units done when the kill landed
    total: int
    seconds: float  # since the command started
    mid_run: bool  # the process was running, no completion record, a unit more done (or all were)
    survivors: list[str] = field(default_factory=list)  # processes of ours still writing after the kill


def markers(folder: Path, pattern: str = "*.json") -> int:
    d = folder / "_done"
    return len(list(d.glob(pattern))) if d.is_dir() else 0


def start(cmd: Command, log: Path) -> subprocess.Popen:
    log.parent.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(cmd.argv, stdout=open(log, "ab"), stderr=subprocess.STDOUT, env=env(),
                            cwd=log.parent, start_new_session=True)


def run_to_end(cmd: Command, log: Path) -> int:
    """Run the command to its end; returns its exit code (the log holds its output)."""
    proc = start(cmd, log)
    try:
        return proc.wait(timeout=cmd.timeout)
    except subprocess.TimeoutExpired:
        _kill_tree(proc.pid)
        raise


def kill_once(cmd: Command, rng: random.Random, log: Path, share: float = 1.0) -> KillRecord:
    """Start the command and SIGKILL its driver at a random point after it finished at least one
    more unit and before its last: within the first `share` of the units it has left."""
    done0 = cmd.units()[0]
    proc = start(cmd, log)
    t0 = time.monotonic()
    target = None
    try:
        while proc.poll() is None and time.monotonic() - t0 < cmd.timeout:
            done, total = cmd.units()
            if total and target is None:
                left = total - 1 - done0  # units that may finish before the kill
                # kill once this many are done (all of them when earlier kills overshot: the
                # command still has its closing work, e.g. near-dup's grouping, to be killed in)...
                target = min(total, done0 + rng.randint(1, max(1, int(left * share))))
            if target is not None and done >= target:
                time.sleep(rng.uniform(0.0, 0.05))  # ...plus a random moment into the next ones
                break
            time.sleep(0.01)
    finally:
        family = _family(proc.pid)
        running = proc.poll() is None
        done, total = cmd.units()
        finished = cmd.finished()
        try:
            os.kill(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
    survivors = _writers_left(family)
    mid = running and not finished and done >= min(done0 + 1, total)
    return KillRecord(cmd.name, done, total, round(time.monotonic() - t0, 2), mid, survivors)


def chain_of_kills(cmd: Command, kills: int, rng: random.Random, log: Path) -> list[KillRecord]:
    """Kill the command `kills` times in a row, each run resuming the one before; kill k lands
    within the first 1/(kills - k + 1) of the units left, so every kill has units to land in."""
    return [kill_once(cmd, rng, log, share=1.0 / (kills - k + 1)) for k in range(kills)]


def kill_a_worker(cmd: Command, log: Path, match: Callable[[psutil.Process], bool], rng: random.Random,
                  settle: float = 0.0) -> tuple[int, bool]:
    """Start the command, SIGKILL one of its worker processes mid-task (the first whose process
    matches, once a random number of units is done); returns (the command's exit code, whether a
    worker was killed while units were left)."""
    proc = start(cmd, log)
    t0, killed = time.monotonic(), False
    target = None
    while proc.poll() is None and time.monotonic() - t0 < cmd.timeout and not killed:
        done, total = cmd.units()
        if total and target is None:
            target = rng.randint(0, max(0, total - 2))
        if target is not None and done >= target:
            for p in _family(proc.pid):
                try:
                    if match(p):
                        time.sleep(settle)
                        done, total = cmd.units()
                        p.kill()
                        killed = done < total
                        break
                except psutil.Error:
                    continue
        time.sleep(0.02)
    try:
        rc = proc.wait(timeout=cmd.timeout)
    except subprocess.TimeoutExpired:
        _kill_tree(proc.pid)
        raise
    return rc, killed


def ray_task_worker(p: psutil.Process) -> bool:
    """A Ray worker process running one of our units (a task or a unit actor)."""
    name = p.name()
    return name.startswith("ray::") and ("execute" in name or "_UnitActor" in name)


def _family(pid: int) -> list[psutil.Process]:
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def _writers_left(family: list[psutil.Process], wait: float = 3.0) -> list[str]:
    """Processes of the killed command that could still write outputs: Ray workers running our
    units, img2dataset's worker and pool. (Ray's idle agents exit on their own later; they never
    write a unit's output.)"""
    deadline = time.monotonic() + wait
    left: list[str] = []
    while time.monotonic() < deadline:
        left = []
        for p in family:
            try:
                if p.is_running() and p.status() != psutil.STATUS_ZOMBIE and _writes_outputs(p):
                    left.append(f"{p.pid} {p.name()}")
            except psutil.Error:
                continue
        if not left:
            return []
        time.sleep(0.1)
    return left


def _writes_outputs(p: psutil.Process) -> bool:
    cmdline = " ".join(p.cmdline())
    return ray_task_worker(p) or "curate.download.worker" in cmdline or "multiprocessing" in cmdline


def _kill_tree(pid: int) -> None:
    for p in reversed(_family(pid)):
        try:
            p.kill()
        except psutil.Error:
            pass


class PartialReader(threading.Thread):
    """Keeps opening every visible data file of `folders` until stopped; collects any that
    cannot be read whole (a reader must never see a partial file)."""

    def __init__(self, folders: list[Path]) -> None:
        super().__init__(daemon=True)
        self.folders, self.errors, self.reads = folders, [], 0
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            for folder in self.folders:
                for path in _visible(folder):
                    self._read(path)
            time.sleep(0.05)

    def _read(self, path: Path) -> None:
        try:
            read_whole(path)
            self.reads += 1
        except FileNotFoundError:
            pass  # replaced or removed between listing and opening: not a partial read
        except Exception as exc:  # noqa: BLE001 - any failure to read a visible file is the finding
            if path.exists():  # still there: it was visible and unreadable
                self.errors.append(f"{path}: {type(exc).__name__}: {exc}")

    def stop(self) -> list[str]:
        self._halt.set()
        self.join(timeout=10)
        return self.errors


def _visible(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    out = []
    for p in folder.iterdir():
        if p.name.startswith(("_", ".")):
            continue
        if p.is_file() and p.suffix in (".parquet", ".tar", ".arrow", ".json", ".safetensors"):
            out.append(p)
    return out


def read_whole(path: Path) -> None:
    """Read a data file to its end, raising on any damage."""
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        pq.read_table(path)
    elif path.suffix == ".tar":
        from core.imageshard import ReadReport, iter_shard

        report = ReadReport(str(path))
        for _ in iter_shard(path, report):
            pass
        if report.damaged or report.refused:
            raise ValueError(report.damaged or report.refused)
    elif path.suffix == ".arrow":
        import pyarrow as pa

        with pa.memory_map(str(path)) as f:
            pa.ipc.open_file(f).read_all()
    elif path.suffix == ".json":
        import json

        json.loads(path.read_text())
    elif path.suffix == ".safetensors":
        from safetensors.torch import load_file

        load_file(str(path))


# ---------------------------------------------------------------- what "the same output" means


def ledger_rows(folder: Path) -> list[tuple]:
    """Every ledger row of a step folder, sorted (a row's identity is its source and row)."""
    import pyarrow.parquet as pq

    parts = sorted((folder / "_ledger").glob("*.parquet"))
    rows = [tuple(_plain(Path(v).name if k == "source" and v else v) for k, v in r.items())  # runs in other folders
            for p in parts for r in pq.read_table(p).to_pylist()]
    return sorted(rows, key=lambda r: tuple(str(x) for x in r))


def accounting(folder: Path) -> dict[str, int]:
    """rows_in of the completion record against the ledger: rows lost and rows doubled."""
    import json

    stats = json.loads((folder / "_stats.json").read_text())
    rows = ledger_rows(folder)
    ids = [(r[1], r[2]) for r in rows]  # (source, row)
    unique = len(set(ids))
    return {"rows_in": stats["rows_in"], "lost": stats["rows_in"] - unique, "doubled": len(ids) - unique}


def table_rows(path: Path) -> list[tuple]:
    import pyarrow.parquet as pq

    return [tuple(_plain(v) for v in r.values()) for r in pq.read_table(path).to_pylist()]


def tar_samples(path: Path) -> dict[str, tuple]:
    """key -> (sha256 of the image, caption, metadata) of a webdataset tar."""
    import hashlib

    from core.imageshard import iter_shard

    return {s.key: (hashlib.sha256(s.image or b"").hexdigest(), s.caption, _plain(s.meta)) for s in iter_shard(path)}


def stats(folder: Path) -> dict:
    import json

    return {k: v for k, v in json.loads((folder / "_stats.json").read_text()).items() if "second" not in k}


def _plain(v):
    """Comparable form of a value: NaN equal to NaN, containers recursively."""
    if isinstance(v, float) and v != v:
        return "nan"
    if isinstance(v, dict):
        return tuple(sorted((k, _plain(x)) for k, x in v.items()))
    if isinstance(v, (list, tuple)):
        return tuple(_plain(x) for x in v)
    return v
