"""The watchdog around the img2dataset worker process: progress, stalls, and a clean end.

    supervise(cmd, env, log, staging, poll, total, stall_seconds, lock_fd) -> exit code

The worker runs in its own process group, so it and the pool it spawns are stopped together.
It never outlives the driver: the worker's first act is `core.procs.die_with_parent(SIGTERM)`
(the kernel sends it SIGTERM when the driver dies, however it dies: SIGKILL, an OOM kill,
Ctrl-C), and its SIGTERM handler kills its whole group (`curate.download.worker`). It is handed the
output folder's lock (`lock_fd`), so the lock is held until the last holder is gone: a rerun
never races a live worker of an earlier run.

While it runs, `poll()` is called every half second; it adopts the shards img2dataset finished
and returns how many are done (the progress bar). A multiprocessing pool whose worker was
killed waits forever for the lost shard: when no file under `staging` has changed for
`stall_seconds`, the group is stopped and the unfinished shards are left for a rerun. Before
the first file appears (img2dataset and its pool importing: 7-9 s, more on a busy machine) the
limit is STARTUP_SECONDS or `stall_seconds`, whichever is longer.
"""
from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Callable

from core.procs import PARENT_ENV
from core.progress import make_progress

POLL_SECONDS = 0.5
STARTUP_SECONDS = 120.0
def supervise(cmd: list[str], env: dict, log: Path, staging: Path, poll: Callable[[], int], total: int,
              stall_seconds: float, lock_fd: int | None = None) -> int:
    """Run `cmd` in its own process group under the watchdog (see module doc); returns its exit code."""
    with open(log, "ab") as out, make_progress() as progress:
        bar = progress.add_task("download shards", total=total)
        env = {**env, PARENT_ENV: str(os.getpid())}
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True,
                                pass_fds=(lock_fd,) if lock_fd is not None else ())
        started = last_change = time.time()  # wall clock, as file mtimes are
        try:
            while proc.poll() is None:
                time.sleep(POLL_SECONDS)
                progress.update(bar, completed=poll())
                last_change = max(last_change, latest_change(staging))
                limit = stall_seconds if last_change > started else max(stall_seconds, STARTUP_SECONDS)
                if time.time() - last_change > limit:
                    out.write(f"\ncurate download: no progress for {limit:g} s, stopped\n".encode())
                    break
        finally:
            stop_group(proc)
        progress.update(bar, completed=poll())
    return proc.returncode


def latest_change(folder: Path) -> float:
    """Newest mtime (wall clock) of the shard files being written in `folder` (the tars,
    parquets and stats the pool's processes write; not the reader's inputs in `_tmp/`, which
    appear before the pool has even started), 0 when none."""
    times = []
    for p in folder.glob("[!_]*"):
        try:
            times.append(p.stat().st_mtime)
        except FileNotFoundError:  # renamed or removed between listing and stat
            pass
    return max(times, default=0.0)


def stop_group(proc: subprocess.Popen) -> None:
    """Stop the worker and every process of its group (the pool it spawned), even when the
    worker itself is already gone and left children behind."""
    for sig, wait in ((signal.SIGTERM, 20.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break  # nobody left in the group
        try:
            proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            continue
        if not _group_alive(proc.pid):
            break
    proc.poll()


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
