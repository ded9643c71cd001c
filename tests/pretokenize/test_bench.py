"""bench/gpu_pretokenize.py runs end to end on CPU (--tiny) and skips cleanly without a GPU."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "gpu_pretokenize.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("gpu_pretokenize_bench", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tiny_on_cpu_reports_both_measures(bench, capsys, monkeypatch):
    monkeypatch.setattr(bench, "TINY_PLAN", {32: {"batch": 2, "images": 4}})
    assert bench.main(["--tiny", "--device", "cpu"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("device: cpu")
    rec = json.loads(next(line for line in lines if line.startswith("{")))
    assert rec["res"] == 32 and rec["end_to_end_images"] == 4
    assert rec["encoder_images_per_s"] > 0 and rec["end_to_end_images_per_s"] > 0


def test_without_gpu_skips_cleanly(bench, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert bench.main([]) == 0
    assert "no GPU available" in capsys.readouterr().out
