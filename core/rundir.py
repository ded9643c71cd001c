"""Run/output folders: resolved config, config-hash guard, per-task completion markers.

Layout of any step's output folder OUT:
    OUT/*.parquet | *.tar | *.arrow   the data, at the top level (readers glob it)
    OUT/_config.yaml                  resolved config + its hash, written before any work
    OUT/_done/<task>.json             completion marker, written after the task's data is renamed
Everything that is not data starts with `_`, so readers that glob `OUT/*.parquet` skip it.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import yaml

from core import atomic
from core.config import ConfigError, config_hash, to_dict


class ConfigMismatchError(ConfigError):
    """The output folder was made by a run with a different config."""


@dataclass(frozen=True)
class RunDir:
    path: Path
    step: str
    hash: str

    @classmethod
    def open(cls, path: str | os.PathLike, step: str, config: Any) -> "RunDir":
        """Create or reopen `path` for `step`. `config` is everything that determines the
        output (settings and inputs, not worker counts). A different config is refused."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        resolved = to_dict(config)
        digest = config_hash({"step": step, "config": resolved})
        cfg_file = path / "_config.yaml"
        if cfg_file.exists():
            old = yaml.safe_load(cfg_file.read_text()) or {}
            if old.get("hash") != digest:
                raise ConfigMismatchError(_mismatch_message(path, step, old, resolved))
        else:
            atomic.write_text(
                cfg_file,
                yaml.safe_dump({"step": step, "hash": digest, "config": resolved}, sort_keys=False),
            )
        atomic.remove_temps(path)  # leftovers of a killed run are never valid data
        return cls(path, step, digest)

    def marker(self, task: str) -> Path:
        return self.path / "_done" / f"{task}.json"

    def is_done(self, task: str) -> bool:
        return self.marker(task).exists()

    def mark_done(self, task: str, info: Mapping[str, Any] | None = None) -> None:
        """Call only after the task's outputs are renamed into place."""
        atomic.write_json(self.marker(task), dict(info or {}))

    def done_info(self, task: str) -> dict[str, Any]:
        return json.loads(self.marker(task).read_text())

    def done_tasks(self) -> list[str]:
        folder = self.path / "_done"
        return sorted(p.stem for p in folder.glob("*.json")) if folder.exists() else []


def _mismatch_message(path: Path, step: str, old: dict, new: dict) -> str:
    old_cfg = _flatten(old.get("config") or {})
    new_cfg = _flatten(new)
    diffs = [
        f"  {k}: {old_cfg.get(k)!r} -> {new_cfg.get(k)!r}"
        for k in sorted(set(old_cfg) | set(new_cfg))
        if old_cfg.get(k) != new_cfg.get(k)
    ]
    if old.get("step") != step:
        diffs.insert(0, f"  step: {old.get('step')!r} -> {step!r}")
    return (
        f"{path} holds the output of a run with a different config; refusing to mix outputs.\n"
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
