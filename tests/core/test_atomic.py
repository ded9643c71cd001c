"""core.atomic: writes land whole or not at all; temp names are skipped and cleaned."""
from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from core import atomic


def test_atomic_path_renames_on_success(tmp_path):
    target = tmp_path / "sub" / "x.bin"
    with atomic.atomic_path(target) as tmp:
        assert tmp.parent == target.parent and tmp.name.startswith("_tmp.") and tmp.name.endswith("x.bin")
        tmp.write_bytes(b"data")
        assert not target.exists()
    assert target.read_bytes() == b"data" and list(target.parent.iterdir()) == [target]


def test_atomic_path_keeps_old_file_on_error(tmp_path):
    target = tmp_path / "x.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic.atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert target.read_text() == "old" and list(tmp_path.iterdir()) == [target]


def test_writers(tmp_path):
    atomic.write_json(tmp_path / "a.json", {"b": 1, "a": [1, 2]})
    assert json.loads((tmp_path / "a.json").read_text()) == {"a": [1, 2], "b": 1}
    atomic.write_text(tmp_path / "t.txt", "héllo")
    assert (tmp_path / "t.txt").read_text() == "héllo"
    table = pa.table({"x": [1, 2]})
    atomic.write_parquet(tmp_path / "p.parquet", table)
    assert pq.read_table(tmp_path / "p.parquet").equals(table)


def test_remove_temps(tmp_path):
    (tmp_path / "d").mkdir()
    for name in ("_tmp.1.a", "d/_tmp.2.b", "keep.parquet"):
        (tmp_path / name).write_text("x")
    assert atomic.remove_temps(tmp_path) == 2
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == ["keep.parquet"]
    assert atomic.temp_name(tmp_path / "x") != atomic.temp_name(tmp_path / "x")
