"""Which run folders the report was given, found by the records they hold, never by name.

A folder is recognised by what its writer left in it:
    _summary.json   a `curate run` pipeline output root: its steps, in order, with their folders
    _config.yaml    a step's run folder; its `step` field says which (dedup, filter, captions,
                    download, neardup, score, pretokenize, train.<stage>)
    manifest.json   a code folder (pretokenize) even without its _config.yaml
    metrics.jsonl   a train run folder even without its _config.yaml
    check.json      a `pretokenize check --output` folder (its `input` names the code folder)
Any other folder is searched below (a few levels), so `curate report demo` finds every run
under demo/. `_`-prefixed folders (bookkeeping) and `.`-folders are never searched.
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from core.rundir import CONFIG, DONE, FAILED, STATS

SUMMARY, MANIFEST, METRICS, CHECK = "_summary.json", "manifest.json", "metrics.jsonl", "check.json"
# Stage order used to list folders that no pipeline summary orders.
ORDER = ("dedup", "filter", "captions", "download", "neardup", "score", "pretokenize", "check", "train")
MAX_DEPTH = 3  # levels searched below a folder that is not itself a record
UNRECORDED = ("train", "check")  # kinds whose writers leave no _stats.json (nothing to be unfinished)


@dataclass(frozen=True)
class Folder:
    """One run folder and what it says about itself."""

    path: Path  # absolute
    kind: str  # a step name from ORDER ("train" for any train.<stage>)
    step: str  # the writer's own name for it (`train.debug`, `filter`, ...)
    config: dict[str, Any]  # parsed _config.yaml ({} when absent)
    stats: dict[str, Any] | None  # parsed _stats.json; None: the step has not finished
    pipeline: str | None = None  # the `curate run` pipeline it belongs to, if any
    seconds: float | None = None  # wall time the pipeline summary records for it
    fused_into: str | None = None  # the step whose pass also ran this one (`curate run` fusion)
    found_input: Path | None = None  # the report's own folder this step read (see `_found_inputs`)

    @property
    def settings(self) -> dict[str, Any]:
        return (self.config.get("config") or {}).get("settings") or {}

    @property
    def recorded_input(self) -> Path | None:
        """The folder this step read, as its _config.yaml records it (None: a plain file set)."""
        recorded = ((self.config.get("config") or {}).get("input") or {}).get("path")
        return Path(recorded) if recorded else None

    @property
    def input_path(self) -> Path | None:
        """The folder this step read: among the folders the report was given when one is it
        (so a moved or copied run is read where it is now), else as recorded."""
        return self.found_input or self.recorded_input

    @property
    def complete(self) -> bool:
        return self.stats is not None

    def units(self) -> tuple[int, int]:
        """(units done, units failed) from the completion markers."""
        return _count(self.path / DONE), _count(self.path / FAILED)

    def status(self) -> str:
        """"complete", or what an unfinished step has done so far ("" for UNRECORDED kinds)."""
        if self.complete or self.kind in UNRECORDED:
            return "complete" if self.complete else ""
        done, failed = self.units()
        return f"unfinished ({done} units done" + (f", {failed} failed" if failed else "") + f"; no {STATS})"


@dataclass
class Inventory:
    folders: list[Folder] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # folders given that hold no record

    def of(self, *kinds: str) -> list[Folder]:
        return [f for f in self.folders if f.kind in kinds]


def discover(paths: list[str | os.PathLike]) -> Inventory:
    """Every run folder in or below `paths`; pipeline steps in pipeline order, the rest by stage."""
    inv, seen = Inventory(), set()
    for p in paths:
        root = Path(p).absolute()
        if not root.is_dir():
            inv.problems.append(f"{p}: not a folder")
            continue
        before = len(inv.folders)
        _walk(root, inv, seen, MAX_DEPTH)
        if len(inv.folders) == before:
            inv.problems.append(f"{p}: no run folder found in it (no _config.yaml, _summary.json, "
                                f"manifest.json, metrics.jsonl or check.json)")
    inv.problems = list(dict.fromkeys(inv.problems))  # a record read twice is one problem
    in_pipeline = [f for f in inv.folders if f.pipeline]
    loose = sorted((f for f in inv.folders if not f.pipeline), key=lambda f: (ORDER.index(f.kind), str(f.path)))
    inv.folders = _found_inputs(in_pipeline + loose)
    return inv


def _found_inputs(folders: list[Folder]) -> list[Folder]:
    """Each folder with `found_input` set to the folder among `folders` its recorded input is:
    the same path, else (a run moved or copied as a whole records where its input *was*) the
    one placed beside it as the input was placed beside it when it ran: the part of its path
    that it does not share with this folder's ends the recorded path (`web-out/download` for
    `web-out/neardup`). The longest such match, if only one; else the recorded path."""
    paths = [f.path for f in folders]
    out = []
    for f in folders:
        recorded = f.recorded_input
        found = None
        if recorded is not None:
            if recorded in paths:
                found = recorded
            else:
                tails = [(_common_tail(p, recorded), p) for p in paths
                         if p != f.path and _common_tail(p, recorded) >= len(p.parts) - _common_head(p, f.path)]
                best = max((k for k, _ in tails), default=0)
                matches = [p for k, p in tails if k == best]
                found = matches[0] if best and len(matches) == 1 else None
        out.append(dataclasses.replace(f, found_input=found))
    return out


def _common_head(a: Path, b: Path) -> int:
    """How many leading path names `a` and `b` share."""
    n = 0
    for x, y in zip(a.parts, b.parts):
        if x != y:
            break
        n += 1
    return n


def _common_tail(a: Path, b: Path) -> int:
    """How many trailing path names `a` and `b` share."""
    n = 0
    for x, y in zip(reversed(a.parts), reversed(b.parts)):
        if x != y:
            break
        n += 1
    return n


def _walk(path: Path, inv: Inventory, seen: set[str], depth: int) -> None:
    if _key(path) in seen:
        return
    if (path / SUMMARY).is_file():
        _add_pipeline(path, inv, seen)
    folder = read_folder(path, inv.problems)
    if folder is not None:
        seen.add(_key(path))
        inv.folders.append(folder)
        if folder.kind != "pretokenize":
            return
    if depth > 0:
        for child in sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith((".", "_"))):
            _walk(child, inv, seen, depth - 1)
    if folder is not None and folder.kind == "pretokenize":
        _walk_check(path / "_check", inv, seen)


def _walk_check(path: Path, inv: Inventory, seen: set[str]) -> None:
    folder = read_folder(path, inv.problems) if path.is_dir() else None
    if folder is not None and _key(path) not in seen:
        seen.add(_key(path))
        inv.folders.append(folder)


def _add_pipeline(root: Path, inv: Inventory, seen: set[str]) -> None:
    """The steps a `curate run` summary lists, in its order, with their recorded times."""
    summary = _json(root / SUMMARY, inv.problems) or {}
    name = str(summary.get("pipeline") or root.name)
    steps = summary.get("steps")
    for entry in steps if isinstance(steps, list) else []:
        if not isinstance(entry, dict):
            continue
        path = _step_folder(root, str(entry.get("output", "")))
        folder = read_folder(path, inv.problems) if path else None
        if folder is None or _key(path) in seen:
            continue
        seen.add(_key(path))
        inv.folders.append(Folder(folder.path, folder.kind, folder.step, folder.config, folder.stats,
                                  pipeline=name, seconds=entry.get("seconds"),
                                  fused_into=entry.get("fused_into")))
    seen.add(_key(root))


def _step_folder(root: Path, output: str) -> Path | None:
    """A summary's `output` is as the pipeline was given (often relative to where it ran): try
    it as a child of the root first (a moved or copied run keeps its steps beside its summary,
    and must not be read from where it was made), then as it is."""
    for candidate in (root / Path(output).name, Path(output)):
        if output and candidate.is_dir():
            return candidate.absolute()
    return None


def read_folder(path: Path, problems: list[str] | None = None) -> Folder | None:
    """The folder's own record, or None when it holds none. A damaged record file is read as
    absent, with a line in `problems`."""
    problems = [] if problems is None else problems
    config = _yaml(path / CONFIG, problems)
    step = str(config.get("step") or "")
    if not step:
        step = next((s for f, s in ((MANIFEST, "pretokenize"), (METRICS, "train"), (CHECK, "check"))
                     if (path / f).is_file()), "")
    kind = "train" if step.startswith("train") else step
    if kind not in ORDER:
        return None
    stats = _json(path / STATS, problems) if kind not in UNRECORDED else None
    return Folder(path.absolute(), kind, step, config, stats)


def _yaml(path: Path, problems: list[str]) -> dict[str, Any]:
    return _record(path, problems, yaml.safe_load, "YAML") or {}


def _json(path: Path, problems: list[str]) -> dict[str, Any] | None:
    return _record(path, problems, json.loads, "JSON")


def _record(path: Path, problems: list[str], parse, what: str) -> dict[str, Any] | None:
    """A record file's mapping; None when absent, or when damaged (cut, not `what`, not a
    mapping), which is also a line in `problems`: the report shows the folder without it."""
    if not path.is_file():
        return None
    try:
        data = parse(path.read_text())
    except (OSError, ValueError, yaml.YAMLError) as exc:
        problems.append(f"{path}: damaged, not readable {what} ({type(exc).__name__}: {' '.join(str(exc).split())}); "
                        "the report leaves it out")
        return None
    if not isinstance(data, dict):
        problems.append(f"{path}: damaged, a {what} {type(data).__name__} where a mapping belongs; the report leaves it out")
        return None
    return data


def _count(folder: Path) -> int:
    return sum(1 for _ in folder.glob("*.json")) if folder.is_dir() else 0


def _key(path: Path) -> str:
    return str(Path(path).resolve())
