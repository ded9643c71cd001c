"""core.units: a done unit is skipped only while every file its marker names is there; a unit
whose output was lost is redone (on a disk and on an object store), transient `_work/` files
are checked only when asked, and a failed unit is recorded."""
from __future__ import annotations

import json

import pytest

from core import atomic, storage
from core.errors import StepIncomplete
from core.rundir import RunDir
from core.units import Unit, is_done, run_units, unfinished

CALLS: list[str] = []


def _write(out: str, name: str) -> dict:
    """Unit: a data part, a ledger part and a transient bundle, all named in the marker."""
    CALLS.append(name)
    folder = storage.path(out)
    for rel in (f"{name}.parquet", f"_ledger/{name}.parquet", f"_work/{name}.bundle"):
        atomic.write_bytes(folder / rel, name.encode())
    return {"files": [f"{name}.parquet", f"_ledger/{name}.parquet", f"_work/{name}.bundle"]}


def _units(out: str) -> list[Unit]:
    return [Unit(n, (out, n)) for n in ("a", "b", "c")]


def _run(rd: RunDir, out: str, **kw) -> list[str]:
    CALLS.clear()
    run_units(rd, _units(out), _write, "test", executor="local", **kw)
    return sorted(CALLS)


@pytest.mark.parametrize("where", ["disk", "s3"])
def test_a_unit_whose_named_file_is_gone_is_redone(tmp_path, where, request, capfd):
    out = str(tmp_path / "out") if where == "disk" else request.getfixturevalue("s3") + "/out"
    folder = storage.path(out)
    rd = RunDir.open(out, "t", {})
    assert _run(rd, out) == ["a", "b", "c"]
    assert _run(rd, out) == []  # all there: nothing runs
    (folder / "b.parquet").unlink()
    (folder / "_ledger" / "c.parquet").unlink()
    capfd.readouterr()
    assert _run(rd, out) == ["b", "c"]
    err = capfd.readouterr().err
    assert "2 done unit(s) lost a file (first: b: b.parquet is gone); redoing them" in " ".join(err.split())
    assert (folder / "b.parquet").exists() and (folder / "_ledger" / "c.parquet").exists()
    assert _run(rd, out) == []


def test_transient_files_are_checked_only_when_asked(tmp_path):
    out = str(tmp_path)
    rd = RunDir.open(out, "t", {})
    _run(rd, out)
    storage.rmtree(storage.path(out) / "_work")  # as a multi-phase step does once consumed
    assert _run(rd, out) == []
    assert unfinished(rd, ["a", "b", "c", "d"]) == {"d"}
    assert _run(rd, out, transient=True) == ["a", "b", "c"]


def test_outputs_are_recorded_and_checked(tmp_path):
    rd = RunDir.open(tmp_path, "t", {})

    def keep(out: str) -> dict:
        (tmp_path / "keep.parquet").write_bytes(b"k")
        return {"kept": 1}

    unit = Unit("finish", (str(tmp_path),), input="job", outputs=("keep.parquet",))
    run_units(rd, [unit], keep, "test", executor="local")
    assert json.loads(rd.marker("finish").read_text())["outputs"] == ["keep.parquet"]
    assert is_done(rd, unit)
    (tmp_path / "keep.parquet").unlink()
    assert not is_done(rd, unit) and unfinished(rd, ["finish"]) == {"finish"}
    # a marker's "files" that is not a list (an older summary) is not taken for file names
    rd.mark_done("old", {"files": 3})
    assert unfinished(rd, ["old"]) == set()


def test_a_failed_unit_is_recorded_and_the_rest_done(tmp_path):
    rd = RunDir.open(tmp_path, "t", {})

    def flaky(name: str) -> dict:
        if name == "b":
            raise ValueError("bad input row 7")
        return {}

    with pytest.raises(StepIncomplete, match=r"1 of 3 units failed \(first: b: ValueError: bad input row 7\)"):
        run_units(rd, [Unit(n, (n,)) for n in "abc"], flaky, "test", executor="local")
    assert rd.done_tasks() == ["a", "c"]
    assert json.loads(rd.failed_path("b").read_text())["error"] == "ValueError: bad input row 7"


def test_a_cut_file_or_a_damaged_marker_is_redone(tmp_path, capfd):
    out = str(tmp_path)
    rd = RunDir.open(out, "t", {})
    _run(rd, out)
    assert json.loads(rd.marker("a").read_text())["bytes"] == {"a.parquet": 1, "_ledger/a.parquet": 1, "_work/a.bundle": 1}
    (tmp_path / "a.parquet").write_bytes(b"")  # cut short (or overwritten by something else)
    rd.marker("b").write_text('{"files": ["b.par')  # a marker damaged from outside
    capfd.readouterr()
    assert _run(rd, out) == ["a", "b"]
    err = " ".join(capfd.readouterr().err.split())
    assert "1 unreadable marker(s) (first: " in err and "b.json); redoing their units" in err
    assert "1 done unit(s) lost a file (first: a: a.parquet has 0 bytes, 1 when it was written)" in err
    assert _run(rd, out) == []


def test_markers_read_by_unfinished_are_not_read_again(tmp_path, monkeypatch):
    # a multi-phase step asks `unfinished` of a later phase, then runs it: one read per marker
    out = str(tmp_path)
    rd = RunDir.open(out, "t", {})
    _run(rd, out)
    (storage.path(out) / "c.parquet").unlink()
    reads: list[str] = []
    real = RunDir.read_marker
    monkeypatch.setattr(RunDir, "read_marker", lambda self, name: reads.append(name) or real(self, name))
    known: dict = {}
    assert unfinished(rd, ["a", "b", "c", "d"], known) == {"c", "d"}
    assert sorted(reads) == ["a", "b", "c"] and set(known) == {"a", "b", "c", "d"} and known["d"] is None
    CALLS.clear()
    run_units(rd, [*_units(out), Unit("d", (out, "d"))], _write, "test", executor="local", known=known)
    assert sorted(CALLS) == ["c", "d"]  # the lost file's unit and the one never run
    assert sorted(reads) == ["a", "b", "c"]  # no marker read twice
