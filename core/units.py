"""One way to run per-unit work (an input file, a bucket, a shard) for every step.

    units = [Unit("p1-00000", (f, 0)), ...]
    infos = run_units(rd, units, partition, "dedup: partition", Resources(cpus=2))
    infos = run_units(rd, units, encode, "pretokenize", Resources(cpus=4, gpus=1),
                      setup=ShardEncoder, setup_args=(vq_path,), actors=8)

A unit runs unless its completion marker (`rd.marker(name)`) is present, was written for
the same input (`Unit.input`, e.g. the size and marker of the shard it reads: a redone
upstream shard is redone here too) and every file it names is still there (its "files", the
data parts, and its "outputs", e.g. `Unit.outputs`): a part or ledger deleted by hand, or lost
on a disk, is redone by the next run instead of failing the step's end or the next step.
Files under `_work/` are a step's transient ones (shuffle bundles, removed once consumed);
they are checked only with `transient=True`, which a multi-phase step passes to a phase when
a later phase still has work that reads them (`unfinished`). It runs
  * as a Ray task, `fn(*args)`;
  * or on a pool of Ray actors that each ran `setup(*setup_args)` once (a model loaded once),
    `fn(state, *args)`; each actor takes the next unit as soon as it is free;
  * or in this process (`executor="local"`) for tests and small inputs.
The unit's function writes its outputs (temp name, rename); the runner then writes the unit's
marker, in the worker: what `fn` returned, its wall and CPU seconds, its input and the Ray
node it ran on. Markers are found with one listing of `_done/` and read in parallel (an
object store answers each read in tens of milliseconds; a step may have thousands of units).

Failure policy, the same for every step: a unit that raises (or whose worker dies) is recorded
in OUT/_failed/<unit>.json with its error and the other units go on; at the end the step
raises StepIncomplete: how many failed and the first error, one line. A rerun of the same
command runs exactly the units without a marker.
"""
from __future__ import annotations

import time
import traceback
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from core import atomic, storage
from core.errors import StepIncomplete
from core.procs import die_with_parent
from core.progress import make_progress
from core.rundir import RunDir

FAILED_DIR = "_failed"
EXECUTORS = ("ray", "local")


@dataclass(frozen=True)
class Unit:
    name: str  # marker name, unique in the run folder ("p1-00003", "00012")
    args: tuple = ()  # arguments of the unit function
    input: Any = None  # JSON-able identity of what the unit reads; a marker for another input is stale
    outputs: tuple[str, ...] = ()  # files (relative to the folder) the unit writes that are not data parts


@dataclass(frozen=True)
class Resources:
    cpus: float = 1  # Ray CPUs per task or actor
    gpus: float = 0  # Ray GPUs per task or actor


TRANSIENT = "_work/"  # a step's scratch inside its folder, removed once consumed


def is_done(rd: RunDir, unit: Unit) -> bool:
    """True when the unit's marker exists, was written for the unit's current input, and every
    file it names is there, at the size it was written with."""
    info = rd.read_marker(unit.name)
    if info is None:
        return False
    return (unit.input is None or info.get("input") == unit.input) and not lost_outputs(rd, {unit.name: info})


def named_outputs(info: dict, transient: bool = False) -> list[str]:
    """The files (relative to the folder) a marker vouches for; `_work/` ones only if `transient`."""
    names = [n for key in ("files", "outputs") if isinstance(info.get(key), list) for n in info[key] if isinstance(n, str)]
    lasting = [n for n in names if not n.startswith(TRANSIENT)]
    return lasting + [n for n in names if n.startswith(TRANSIENT)] if transient else lasting  # lasting first


class Lost(str):
    """Why a done unit's output no longer holds (the str), with the file it is about."""

    path: str = ""


def lost_outputs(rd: RunDir, infos: dict[str, dict], transient: bool = False) -> dict[str, Lost]:
    """Each marker of `infos` (name -> info) that names a file which is gone, or whose size
    differs from the one its marker recorded (a cut or overwritten file) -> why, for the first
    such file. One listing per folder the markers name, on a disk and on an object store."""
    wanted = {name: named_outputs(info, transient) for name, info in infos.items()}
    folders = {n.rpartition("/")[0] for names in wanted.values() for n in names}
    listed = {f: storage.file_sizes(rd.path / f if f else rd.path) for f in folders}
    lost = {}
    for name, names in wanted.items():
        recorded = infos[name].get("bytes") if isinstance(infos[name].get("bytes"), dict) else {}
        for n in names:
            folder, _, base = n.rpartition("/")
            size = listed[folder].get(base)
            if size is None:
                why = Lost(f"{n} is gone")
            elif n in recorded and recorded[n] != size:
                why = Lost(f"{n} has {size:,} bytes, {recorded[n]:,} when it was written")
            else:
                continue
            why.path = n
            lost[name] = why
            break
    return lost


def unfinished(rd: RunDir, names: Sequence[str], known: dict[str, dict | None] | None = None) -> set[str]:
    """The units of `names` that would run now: no marker, or a marker naming a lost file
    (inputs aside: a multi-phase step asks this of a later phase before running earlier ones).
    Each marker read (None for none) is added to `known`, to pass to that phase's `run_units`:
    its markers are then read once, not twice (a GET each on an object store)."""
    infos = done_infos(rd, names)
    if known is not None:
        known.update({n: infos.get(n) for n in names})
    return (set(names) - set(infos)) | set(lost_outputs(rd, infos))


READ_THREADS = 16  # markers read at once


def done_infos(rd: RunDir, names: Sequence[str], known: dict[str, dict | None] | None = None) -> dict[str, dict]:
    """The marker info of each of `names` that has a readable marker: one listing, parallel
    reads. A damaged marker (cut, emptied) counts as none, so its unit is redone. Names in
    `known` (see `unfinished`) are taken from it unread: nothing has run them since."""
    known = known or {}
    ask = [n for n in names if n not in known]
    found: dict[str, dict | None] = {}
    if ask:
        present = set(rd.done_tasks())
        wanted = [n for n in ask if n in present]
        with ThreadPoolExecutor(READ_THREADS) as pool:
            found = dict(zip(wanted, pool.map(rd.read_marker, wanted)))
    damaged = [n for n, info in found.items() if info is None]
    if damaged:
        _say(f"{description_of(rd)}: {len(damaged)} unreadable marker(s) (first: {rd.marker(damaged[0])}); "
             "redoing their units")
    infos = {n: known.get(n) or found.get(n) for n in names}
    return {n: info for n, info in infos.items() if info is not None}


def _node() -> str | None:
    """The Ray node this process runs on (None outside Ray): markers say where each unit ran."""
    import sys

    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return None
    return ray.get_runtime_context().get_node_id()


def execute(rd: RunDir, unit: Unit, fn: Callable[..., dict], state: Any = None, worker: bool = False) -> dict:
    """Run one unit here (in a Ray worker or the driver) and write its marker; returns the marker info.
    In a worker, the worker first ties its life to its raylet's (core.procs): a worker whose
    driver was killed never finishes a unit into a folder a rerun is using."""
    if worker:
        die_with_parent()
    wall, cpu = time.perf_counter(), time.process_time()
    info = fn(*unit.args) if state is None else fn(state, *unit.args)
    info = {**(info or {}), "task_seconds": round(time.perf_counter() - wall, 3),
            "task_cpu_seconds": round(time.process_time() - cpu, 3)}
    if unit.input is not None:
        info["input"] = unit.input
    if unit.outputs:
        info["outputs"] = list(unit.outputs)
    named = named_outputs(info, transient=True)
    if named:  # the size each file was written with: a cut or overwritten file is found on a rerun
        sizes = storage.sizes_of([rd.path / n for n in named])
        info["bytes"] = {n: b for n, b in zip(named, sizes) if b is not None}
    node = _node()
    if node is not None:
        info["node"] = node
    rd.mark_done(unit.name, info)  # last: the unit's outputs are in place
    rd.failed_path(unit.name).unlink(missing_ok=True)
    return info


class _UnitActor:
    """A Ray actor body: the state (`setup(*args)`) is built once; units run on it in turn."""

    def __init__(self, setup: Callable[..., Any], args: tuple) -> None:
        die_with_parent()
        self.state = setup(*args)

    def run(self, rd: RunDir, unit: Unit, fn: Callable[..., dict]) -> dict:
        return execute(rd, unit, fn, self.state)


def run_units(rd: RunDir, units: Sequence[Unit], fn: Callable[..., dict], description: str,
              resources: Resources = Resources(), *, setup: Callable[..., Any] | None = None,
              setup_args: tuple = (), actors: int | None = None, executor: str = "ray",
              transient: bool = False, known: dict[str, dict | None] | None = None) -> list[dict]:
    """Run every unit not yet done (see module doc); returns each unit's marker info, in order.
    `known`: these units' markers as `unfinished` read them earlier in this run.
    Raises StepIncomplete after all units ran if any failed."""
    if executor not in EXECUTORS:
        raise ValueError(f"executor must be one of {', '.join(EXECUTORS)}, got {executor!r}")
    infos = done_infos(rd, [u.name for u in units], known)
    lost = lost_outputs(rd, infos, transient)
    told = {n: why for n, why in lost.items() if not why.path.startswith(TRANSIENT)}  # consumed scratch is no news
    if told:
        name, why = next(iter(told.items()))
        _say(f"{description_of(rd)}: {len(told)} done unit(s) lost a file (first: {name}: {why}); redoing them")
    for name in lost:
        del infos[name]
    todo = [u for u in units if u.name not in infos or (u.input is not None and infos[u.name].get("input") != u.input)]
    skipped = len(units) - len(todo)
    label = description + (f" ({skipped} done before)" if skipped else "")
    if todo:
        rd.unfinish()  # readers see the folder as unfinished until the step completes it again
        if executor == "local":
            ran, failures = _run_local(rd, todo, fn, label, setup, setup_args)
        elif setup is not None:
            ran, failures = _run_actors(rd, todo, fn, label, resources, setup, setup_args, actors)
        else:
            ran, failures = _run_tasks(rd, todo, fn, label, resources)
        if failures:
            _record(rd, failures)
            raise StepIncomplete(incomplete_message(rd, failures, len(units)))
        infos.update(ran)
    return [infos[u.name] for u in units]


def incomplete_message(rd: RunDir, failures: dict[str, str], total: int) -> str:
    name, error = next(iter(failures.items()))
    return (f"{description_of(rd)}: {len(failures)} of {total} units failed (first: {name}: {error}); "
            f"the others are done. Errors in {rd.path / FAILED_DIR}; rerun the same command to redo the failed units")


def _say(text: str) -> None:
    from rich.console import Console

    Console(stderr=True, highlight=False, soft_wrap=True).print(text, markup=False)  # paths stay whole


def description_of(rd: RunDir) -> str:
    return f"{rd.step} in {rd.path}"


class Failure(str):
    """A unit's error as one line (the str), with the whole text kept for OUT/_failed/."""

    detail: str = ""


def _failure(exc: BaseException) -> Failure:
    cause = getattr(exc, "cause", None)  # a Ray task error carries the task's own exception
    own = cause if isinstance(cause, BaseException) else exc
    lines = str(own).strip().splitlines()
    out = Failure(f"{type(own).__name__}: {lines[0] if lines else ''}")
    out.detail = "".join(traceback.format_exception(exc))
    return out


def _record(rd: RunDir, failures: dict[str, str]) -> None:
    for name, error in failures.items():
        atomic.write_json(rd.failed_path(name), {"unit": name, "error": str(error),
                                                 "detail": getattr(error, "detail", "")})


Outcome = tuple[dict[str, dict], dict[str, str]]  # (marker info of each unit that ran, error of each that failed)


def _run_local(rd: RunDir, todo: list[Unit], fn: Callable, label: str, setup: Callable | None,
               setup_args: tuple) -> Outcome:
    state = setup(*setup_args) if setup is not None else None
    infos, failures = {}, {}
    with make_progress() as progress:
        bar = progress.add_task(label, total=len(todo))
        for unit in todo:
            try:
                infos[unit.name] = execute(rd, unit, fn, state)
            except Exception as exc:  # noqa: BLE001 - the failure policy records every error
                failures[unit.name] = _failure(exc)
            progress.advance(bar)
    return infos, failures


_REMOTE: Any = None


def _run_tasks(rd: RunDir, todo: list[Unit], fn: Callable, label: str, resources: Resources) -> Outcome:
    global _REMOTE
    import ray

    from core.ray_util import init_ray

    init_ray()  # the caller's Ray (CLI, pipeline, tests), else a local one
    _REMOTE = _REMOTE or ray.remote(execute)
    # Ray retries a task whose worker died (an OOM kill, a lost node); an exception the unit
    # raised is not retried: it is recorded.
    remote = _REMOTE.options(num_cpus=resources.cpus, num_gpus=resources.gpus)
    refs = {remote.remote(rd, u, fn, None, True): u for u in todo}
    infos, failures = {}, {}
    pending = list(refs)
    with make_progress() as progress:
        bar = progress.add_task(label, total=len(refs))
        while pending:
            (ref,), pending = ray.wait(pending, num_returns=1)
            try:
                infos[refs[ref].name] = ray.get(ref)
            except Exception as exc:  # noqa: BLE001 - a task error or a dead worker, recorded
                failures[refs[ref].name] = _failure(exc)
            progress.advance(bar)
    return infos, failures


def _run_actors(rd: RunDir, todo: list[Unit], fn: Callable, label: str, resources: Resources,
                setup: Callable, setup_args: tuple, actors: int | None) -> Outcome:
    """Keep every actor busy with one unit at a time; a dead actor is dropped (its unit recorded
    as failed), an actor whose unit raised takes the next one."""
    import ray
    from ray.exceptions import RayActorError

    from core.ray_util import init_ray

    init_ray()
    cls = ray.remote(_UnitActor).options(num_cpus=resources.cpus, num_gpus=resources.gpus)
    pool = [cls.remote(setup, setup_args) for _ in range(max(1, min(actors or 1, len(todo))))]
    free, queue, inflight, infos, failures = list(pool), deque(todo), {}, {}, {}
    try:
        with make_progress() as progress:
            bar = progress.add_task(label, total=len(todo))
            while queue or inflight:
                while free and queue:
                    actor, unit = free.pop(), queue.popleft()
                    inflight[actor.run.remote(rd, unit, fn)] = (actor, unit)
                if not inflight:  # every actor died
                    failures.update({u.name: "no live worker left" for u in queue})
                    break
                (ref,), _ = ray.wait(list(inflight), num_returns=1)
                actor, unit = inflight.pop(ref)
                try:
                    infos[unit.name] = ray.get(ref)
                    free.append(actor)
                except RayActorError as exc:
                    failures[unit.name] = _failure(exc)
                except Exception as exc:  # noqa: BLE001 - the unit raised: keep the actor
                    failures[unit.name] = _failure(exc)
                    free.append(actor)
                progress.advance(bar)
    finally:
        for actor in pool:
            ray.kill(actor)
    return infos, failures
