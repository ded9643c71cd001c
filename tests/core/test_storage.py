"""core.storage + core.atomic against a real S3 API (moto's server on loopback, found through
AWS_ENDPOINT_URL only), and the same calls on a local folder."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from core import atomic, storage
from core.storage import RemotePath


def test_path_makes_local_paths_absolute_and_parses_uris(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert storage.path("runs/laion") == tmp_path / "runs" / "laion"
    assert storage.path(f"file://{tmp_path}/x") == tmp_path / "x"
    remote = storage.path("s3://bucket/runs/laion/")
    assert isinstance(remote, RemotePath) and str(remote) == "s3://bucket/runs/laion"
    assert str(remote / "_done" / "p1.json") == "s3://bucket/runs/laion/_done/p1.json"
    assert (remote / "a.parquet").stem == "a" and (remote / "a.tar").suffix == ".tar"
    assert str(storage.path("gcs://b/k")) == "gs://b/k" and storage.is_remote("s3://b/k") and not storage.is_remote("b/k")


@pytest.mark.parametrize("where", ["local", "s3"])
def test_atomic_writes_reads_listing_and_removal(where, tmp_path, request) -> None:
    root = storage.path(tmp_path / "out") if where == "local" else storage.path(request.getfixturevalue("s3"))
    atomic.write_json(root / "_done" / "a.json", {"rows": 3})
    atomic.write_text(root / "_done" / "b.json", "{}")
    atomic.write_parquet(root / "part-00000.parquet", pa.table({"x": [1, 2]}))
    assert json.loads((root / "_done" / "a.json").read_text()) == {"rows": 3}
    assert (root / "_done" / "a.json").is_file() and (root / "_done").is_dir() and not (root / "nope").exists()
    assert sorted(p.name for p in root.glob("_done/*.json")) == ["a.json", "b.json"]
    assert [p.name for p in root.glob("*.parquet")] == ["part-00000.parquet"]
    assert (root / "part-00000.parquet").stat().st_size > 0
    fs, key = storage.arrow_fs(root / "part-00000.parquet")
    assert pq.read_table(key, filesystem=fs).column("x").to_pylist() == [1, 2]
    with storage.local_copy(root / "part-00000.parquet") as local:
        assert isinstance(local, Path) and pq.read_table(local).num_rows == 2
    (root / "_done" / "b.json").unlink()
    (root / "_done" / "b.json").unlink(missing_ok=True)
    assert not (root / "_done" / "b.json").exists()
    storage.rmtree(root)
    assert not (root / "part-00000.parquet").exists()


@pytest.mark.parametrize("where", ["local", "s3"])
def test_ranged_reads_exact_or_up_to_the_end(where, tmp_path, request) -> None:
    root = storage.path(tmp_path) if where == "local" else storage.path(request.getfixturevalue("s3"))
    atomic.write_bytes(root / "blob", bytes(range(10)))
    assert storage.read_at(root / "blob", 2, 3) == b"\x02\x03\x04"
    assert storage.read_at(root / "blob", 8, 5) == b"\x08\x09" and storage.read_at(root / "blob", 12, 4) == b""
    assert storage.read_range(root / "blob", 7, 3) == b"\x07\x08\x09"
    with pytest.raises(OSError, match="expected 5 bytes at offset 8, read 2"):
        storage.read_range(root / "blob", 8, 5)


def test_a_failed_write_leaves_nothing_on_s3(s3) -> None:
    target = storage.path(s3) / "half.bin"
    with pytest.raises(RuntimeError):
        with atomic.atomic_path(target) as tmp:
            tmp.write_bytes(b"partial")
            raise RuntimeError("killed mid-write")
    assert not target.exists()
    assert os.environ["AWS_ENDPOINT_URL"].startswith("http://127.0.0.1:")  # found only through the variable


def test_a_run_folder_on_s3_markers_ledger_lease(s3) -> None:
    import pyarrow as pa

    from core import ledger, lease, rundir
    from core.rundir import RunDir

    rd = RunDir.open(s3 + "/step", "filter", {"x": 1})
    assert isinstance(rd.path, RemotePath) and (rd.path / "_config.yaml").is_file()
    rd.mark_done("part-00000", {"rows": 2})
    assert rd.is_done("part-00000") and rd.done_tasks() == ["part-00000"] and rd.done_info("part-00000") == {"rows": 2}
    ledger.write(rd.path, "part-00000", ledger.rows("filter", "a", [{"row": 0, "key": "k", "state": "kept"},
                                                                    {"row": 1, "key": "j", "state": "failed"}]))
    assert ledger.counts(rd.path) == {"kept": 1, "filtered": 0, "duplicate": 0, "failed": 1}
    ledger.write_stats(rd.path, "filter", 2, ledger.counts(rd.path))
    assert rundir.check_finished(rd.path)["complete"]
    held = json.loads((rd.path / "_lock").read_text())
    assert held["pid"] == os.getpid() and held["expires"] > 0
    assert RunDir.open(s3 + "/step", "filter", {"x": 1}).hash == rd.hash  # ours: reentrant
    (rd.path / "_lock").unlink()  # pretend another, live run holds it
    atomic.write_json(rd.path / "_lock", {"owner": "someone-else", "pid": 1, "host": "h", "expires": 4e9})
    lease._HELD.clear()
    with pytest.raises(lease.LeaseBusyError, match="another run is writing this folder"):
        RunDir.open(s3 + "/step", "filter", {"x": 1})
