"""Checkpoints: everything needed to continue a run bit-for-bit, written atomically.

    RUN/checkpoints/step_00001000/
        model.safetensors   model weights (the unwrapped module's state dict)
        ema.safetensors     EMA weights (only when EMA is on)
        state.pt            optimizer, scheduler, EMA update count, step, data cursor,
                            torch/CUDA/numpy/python RNG states, config hash
        meta.json           what `train sample` needs to rebuild the model without the run's
                            config: model config, text encoder, VQ path, grid, resolution

The folder is written under a `_tmp.` name and renamed, so `latest()` never sees a partial
checkpoint, even after SIGKILL. Older checkpoints beyond `keep` are deleted afterwards.
"""
from __future__ import annotations

import json
import pickle
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from core import atomic
from core.errors import UserError

CKPT_DIR = "checkpoints"
_STEP_RE = re.compile(r"^step_(\d+)$")
FILES = ("model.safetensors", "state.pt", "meta.json")


class CheckpointError(UserError):
    """A checkpoint that cannot be used (missing files, another config)."""


def step_dir(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / CKPT_DIR / f"step_{step:08d}"


def rng_state() -> dict[str, Any]:
    """Every global RNG the loop may touch, in a form `torch.load(weights_only=True)` accepts."""
    np_state = np.random.get_state(legacy=False)
    np_state["state"]["key"] = np_state["state"]["key"].tolist()
    out = {"torch": torch.get_rng_state(), "numpy": np_state, "python": random.getstate()}
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np_state = dict(state["numpy"])
    np_state["state"] = dict(np_state["state"], key=np.array(np_state["state"]["key"], dtype=np.uint32))
    np.random.set_state(np_state)
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _tensors(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # safetensors refuses shared storage and views: give it fresh contiguous CPU copies.
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in weights.items()}


def save(
    run_dir: str | Path,
    step: int,
    model_weights: dict[str, torch.Tensor],
    state: dict[str, Any],
    meta: dict[str, Any],
    ema_weights: dict[str, torch.Tensor] | None = None,
    keep: int = 3,
) -> Path:
    """Write checkpoint `step` (temp folder, then rename) and prune to the newest `keep`."""
    final = step_dir(run_dir, step)
    tmp = atomic.temp_name(final)
    tmp.mkdir(parents=True)
    try:
        save_file(_tensors(model_weights), str(tmp / "model.safetensors"), metadata={"step": str(step)})
        if ema_weights is not None:
            save_file(_tensors(ema_weights), str(tmp / "ema.safetensors"), metadata={"step": str(step)})
        torch.save(dict(state, step=step), tmp / "state.pt")
        (tmp / "meta.json").write_text(json.dumps(dict(meta, step=step), indent=2, default=str) + "\n")
        if final.exists():  # a re-save of the same step (e.g. final == last periodic)
            shutil.rmtree(final)
        tmp.rename(final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    prune(run_dir, keep)
    return final


def all_steps(run_dir: str | Path) -> list[int]:
    """Steps of the complete checkpoints under RUN/checkpoints, ascending."""
    folder = Path(run_dir) / CKPT_DIR
    if not folder.is_dir():
        return []
    steps = []
    for p in folder.iterdir():
        m = _STEP_RE.match(p.name)
        if m and all((p / f).is_file() for f in FILES):
            steps.append(int(m.group(1)))
    return sorted(steps)


def latest(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint folder of a run, or None."""
    steps = all_steps(run_dir)
    return step_dir(run_dir, steps[-1]) if steps else None


def prune(run_dir: str | Path, keep: int) -> None:
    """Delete all but the newest `keep` checkpoints (keep <= 0 keeps all)."""
    if keep > 0:
        for step in all_steps(run_dir)[:-keep]:
            shutil.rmtree(step_dir(run_dir, step), ignore_errors=True)


def remove_partial(run_dir: str | Path) -> int:
    """Delete `_tmp.*` checkpoint folders a killed run left behind; returns how many."""
    folder = Path(run_dir) / CKPT_DIR
    stale = [p for p in folder.glob("_tmp.*") if p.is_dir()] if folder.is_dir() else []
    for p in stale:
        shutil.rmtree(p, ignore_errors=True)
    return len(stale)


def resolve(path: str | Path) -> Path:
    """A checkpoint folder, or a run folder (-> its latest checkpoint)."""
    path = Path(path)
    if all((path / f).is_file() for f in FILES):
        return path
    found = latest(path)
    if found is None:
        raise CheckpointError(f"{path}: neither a checkpoint folder nor a run folder with checkpoints")
    return found


def has_ema(ckpt: Path) -> bool:
    """Whether a checkpoint folder holds EMA weights (the run had EMA on)."""
    return (ckpt / "ema.safetensors").is_file()


def load_weights(ckpt: Path, ema: bool = False) -> dict[str, torch.Tensor]:
    """Model (or EMA) weights of a checkpoint folder, on the CPU."""
    name = "ema.safetensors" if ema else "model.safetensors"
    if not (ckpt / name).is_file():
        raise CheckpointError(f"{ckpt}: no {name}" + (" (the run had EMA off, or the file was removed)" if ema else ""))
    try:
        return load_file(str(ckpt / name))
    except Exception as exc:  # safetensors' own error type for a cut or overwritten file
        raise _damaged(ckpt / name, exc) from exc


def _damaged(path: Path, exc: BaseException) -> CheckpointError:
    first = (str(exc).splitlines() or [type(exc).__name__])[0]
    return CheckpointError(f"{path}: unreadable ({type(exc).__name__}: {first}); the checkpoint is damaged: "
                           f"remove its folder to use the one before it")


def load_state(ckpt: Path) -> dict[str, Any]:
    """The training state of a checkpoint. `weights_only=True`: tensors, numbers, strings and
    containers only; a pickle that would build any other object (and so could run code) is
    refused, never executed."""
    try:
        return torch.load(ckpt / "state.pt", map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(f"{ckpt / 'state.pt'}: refused, it holds more than tensors and plain values "
                              f"(a pickled object could run code): {str(exc).splitlines()[0]}") from exc
    except (EOFError, RuntimeError, OSError) as exc:  # cut short or overwritten (click reads EOFError as Abort)
        raise _damaged(ckpt / "state.pt", exc) from exc


def load_meta(ckpt: Path) -> dict[str, Any]:
    try:
        meta = json.loads((ckpt / "meta.json").read_text())
    except ValueError as exc:  # empty or half-written
        raise _damaged(ckpt / "meta.json", exc) from exc
    if not isinstance(meta, dict):
        raise _damaged(ckpt / "meta.json", ValueError(f"a JSON {type(meta).__name__}, not an object"))
    return meta
