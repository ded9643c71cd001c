"""core.rundir: resolved config first, a different config refused, markers, temp cleanup."""
from __future__ import annotations

import yaml
import pytest

from core.rundir import ConfigMismatchError, RunDir


def test_open_writes_config_and_reopens(tmp_path):
    rd = RunDir.open(tmp_path / "out", "filter", {"aesthetic": 4.5, "inner": {"a": 1}})
    doc = yaml.safe_load((tmp_path / "out" / "_config.yaml").read_text())
    assert doc["step"] == "filter" and doc["hash"] == rd.hash and doc["config"]["aesthetic"] == 4.5
    assert RunDir.open(tmp_path / "out", "filter", {"aesthetic": 4.5, "inner": {"a": 1}}).hash == rd.hash


def test_different_config_or_step_is_refused_with_the_difference(tmp_path):
    RunDir.open(tmp_path, "filter", {"aesthetic": 4.5, "inner": {"a": 1}})
    with pytest.raises(ConfigMismatchError) as err:
        RunDir.open(tmp_path, "filter", {"aesthetic": 5.0, "inner": {"a": 2}})
    msg = str(err.value)
    assert "refusing to mix outputs" in msg and "aesthetic: 4.5 -> 5.0" in msg and "inner.a: 1 -> 2" in msg
    assert "new output folder" in msg
    with pytest.raises(ConfigMismatchError, match="step: 'filter' -> 'dedup'"):
        RunDir.open(tmp_path, "dedup", {"aesthetic": 4.5, "inner": {"a": 1}})


def test_markers(tmp_path):
    rd = RunDir.open(tmp_path, "s", {})
    assert not rd.is_done("t1") and rd.done_tasks() == []
    rd.mark_done("t1", {"rows": 3})
    rd.mark_done("t0")
    assert rd.is_done("t1") and rd.done_info("t1") == {"rows": 3} and rd.done_tasks() == ["t0", "t1"]
    assert rd.marker("t1") == tmp_path / "_done" / "t1.json"


def test_open_removes_leftover_temps(tmp_path):
    RunDir.open(tmp_path, "s", {})
    (tmp_path / "_tmp.abc.part-0.parquet").write_text("half")
    (tmp_path / "part-1.parquet").write_text("whole")
    RunDir.open(tmp_path, "s", {})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["_config.yaml", "part-1.parquet"]
