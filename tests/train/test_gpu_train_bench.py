"""bench/gpu_train.py runs end to end on CPU with the debug preset, and skips cleanly without a GPU."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "gpu_train.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("gpu_train_bench", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_debug_preset_on_cpu_reports_throughput(bench, capsys):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert bench.main(["--small", "--device", "cpu", "--warmup", "0", "--steps", "2", "--batch-size", "2",
                           "--peak-tflops", "1.0"]) == 0
    finally:
        torch.set_num_threads(threads)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("device: cpu | preset debug")
    record = json.loads(next(line for line in lines if line.startswith("{")))
    assert record["res"] == 256 and record["batch"] == 2 and record["grid"] == "16x16"
    assert record["tokens_per_s"] == pytest.approx(2 * 256 / record["step_s_median"])
    assert record["mfu"] == pytest.approx(record["tflops"] / 1.0)


def test_big_preset_without_gpu_skips_cleanly(bench, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert bench.main([]) == 0
    assert capsys.readouterr().out.startswith("SKIPPED: no CUDA GPU visible")


def test_accumulation_text_tower_and_compiled_blocks_on_cpu(bench, capsys):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert bench.main(["--small", "--device", "cpu", "--warmup", "1", "--steps", "1", "--batch-size", "2",
                           "--accum", "2", "--text-tower", "--compile", "--compile-backend", "aot_eager",
                           "--peak-tflops", "1.0"]) == 0
    finally:
        torch.set_num_threads(threads)
    record = json.loads(next(line for line in capsys.readouterr().out.splitlines() if line.startswith("{")))
    assert record["accum"] == 2 and record["text_tower"] and record["compile"]
    assert record["images_per_s"] == pytest.approx(4 / record["step_s_median"])  # 2 micro-batches of 2
    assert record["sdpa_choice"] == "FLASH_ATTENTION"
    assert record["attention_ops"] == ["aten::_scaled_dot_product_flash_attention_for_cpu",
                                       "aten::_scaled_dot_product_flash_attention_for_cpu_backward"]
