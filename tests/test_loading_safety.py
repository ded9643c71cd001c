"""Loading stays safe: every file the toolkit loads that could carry code is refused with a clear
error, and the payload never runs. A pickle payload in a training checkpoint, a scorer
checkpoint and a text-encoder checkpoint; Python tags in pipelines.yaml and in a run record."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from core import config
from core.errors import UserError
from core.rundir import RunDir


class Payload:
    """Unpickling this runs `touch MARKER`: what a hostile checkpoint would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def hostile_pickle(path: Path, marker: Path, **tensors: torch.Tensor) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({**tensors, "extra": Payload(marker)}, path)
    return path


def test_a_training_checkpoint_with_a_payload_is_refused(tmp_path) -> None:
    from train.checkpoint import CheckpointError, load_state

    marker = tmp_path / "ran"
    hostile_pickle(tmp_path / "ckpt" / "state.pt", marker, step=torch.tensor(3))
    with pytest.raises(CheckpointError, match="refused"):
        load_state(tmp_path / "ckpt")
    assert not marker.exists()


def test_a_scorer_checkpoint_with_a_payload_is_refused(tmp_path) -> None:
    from curate.images.scorers import ScorerError
    from curate.images.scorers.aesthetic import load_aesthetic

    marker = tmp_path / "ran"
    path = hostile_pickle(tmp_path / "aesthetic.pth", marker, **{"layers.0.weight": torch.zeros(2, 2)})
    with pytest.raises(ScorerError, match="aesthetic.pth"):
        load_aesthetic(str(path))
    assert not marker.exists()


def test_a_text_encoder_checkpoint_with_a_payload_is_refused(tmp_path) -> None:
    from train.text_encoder import TextEncoder

    marker = tmp_path / "ran"
    path = hostile_pickle(tmp_path / "open_clip_pytorch_model.bin", marker, **{"positional_embedding": torch.zeros(2)})
    with pytest.raises(UserError, match="refused"):
        TextEncoder.from_checkpoint(path)
    assert not marker.exists()


HOSTILE_YAML = "curate:\n  filter: !!python/object/apply:os.system ['touch {marker}']\n"


def test_yaml_with_python_tags_is_refused(tmp_path, monkeypatch) -> None:
    marker = tmp_path / "ran"
    cfg = tmp_path / "pipelines.yaml"
    cfg.write_text(HOSTILE_YAML.format(marker=marker))
    with pytest.raises(config.ConfigError, match="not valid YAML"):
        config.load_yaml(cfg)
    out = tmp_path / "out"
    RunDir.open(out, "filter", {"a": 1})
    (out / "_config.yaml").write_text("step: filter\nhash: !!python/object/apply:os.system ['touch {0}']\n".format(marker))
    with pytest.raises(config.ConfigError, match="not a valid run record"):
        RunDir.open(out, "filter", {"a": 1})
    assert not marker.exists()
