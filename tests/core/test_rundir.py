"""core.rundir: identity first, a different one refused, markers, temp cleanup, one run at a
time, and inputs that are unfinished step outputs refused."""
from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass

import yaml
import pytest

from core import rundir
from core.config import execution
from core.errors import UserError
from core.rundir import ConfigMismatchError, FolderBusyError, RunDir


def test_open_writes_config_and_reopens(tmp_path):
    rd = RunDir.open(tmp_path / "out", "filter", {"aesthetic": 4.5, "inner": {"a": 1}})
    doc = yaml.safe_load((tmp_path / "out" / "_config.yaml").read_text())
    assert doc["step"] == "filter" and doc["hash"] == rd.hash and doc["config"]["aesthetic"] == 4.5
    assert RunDir.open(tmp_path / "out", "filter", {"aesthetic": 4.5, "inner": {"a": 1}}).hash == rd.hash


def test_different_config_or_step_is_refused_with_the_difference(tmp_path):
    RunDir.open(tmp_path, "filter", {"aesthetic": 4.5, "inner": {"a": 1}}).mark_done("t0")
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
    assert sorted(p.name for p in tmp_path.iterdir()) == ["_config.yaml", "_lock", "part-1.parquet"]


@dataclass
class _Cfg:
    threshold: float = 4.5
    threads: int = execution(1)


def test_identity_leaves_out_execution_fields_and_names_input_changes(tmp_path):
    inp = tmp_path / "in"
    inp.mkdir()
    (inp / "a.parquet").write_bytes(b"1234")
    fp = rundir.fingerprint(inp, [inp / "a.parquet"])
    ident = rundir.identity(_Cfg(threads=8), fp)
    assert ident["settings"] == {"threshold": 4.5} and ident["input"]["files"] == 1
    rd = RunDir.open(tmp_path / "out", "filter", ident)
    rd.mark_done("t0")
    assert RunDir.open(tmp_path / "out", "filter", rundir.identity(_Cfg(threads=2), fp)).hash == rd.hash
    (inp / "a.parquet").write_bytes(b"12345")  # the input changed: refused, saying it is the input
    changed = rundir.identity(_Cfg(), rundir.fingerprint(inp, [inp / "a.parquet"]))
    with pytest.raises(ConfigMismatchError, match="different input"):
        RunDir.open(tmp_path / "out", "filter", changed)


def test_an_unfinished_step_output_is_refused_as_input(tmp_path):
    rd = RunDir.open(tmp_path / "dl", "download", {"x": 1})
    rd.mark_done("00000")
    rd.failed_path("00001").parent.mkdir(parents=True)
    rd.failed_path("00001").write_text("{}")
    with pytest.raises(UserError, match=r"unfinished `download` run \(1 units done, 1 failed \(e.g. 00001\)"):
        rundir.check_finished(tmp_path / "dl")
    assert rundir.check_finished(tmp_path / "dl", allow_incomplete=True)["complete"] is False
    (tmp_path / "dl" / "_stats.json").write_text('{"rows_in": 1, "kept": 1, "task_seconds": 3}')
    record = rundir.check_finished(tmp_path / "dl")
    assert record["complete"] and record["step"] == "download"
    assert rundir.check_finished(tmp_path) is None  # a plain folder of files: nothing to check
    # The completion record's digest ignores timings: a rerun that changes nothing keeps it.
    (tmp_path / "dl" / "_stats.json").write_text('{"rows_in": 1, "kept": 1, "task_seconds": 9}')
    assert rundir.step_record(tmp_path / "dl")["record"] == record["record"]


def test_a_second_live_run_on_a_folder_is_refused_and_a_dead_one_leaves_no_lock(tmp_path):
    out = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from core.rundir import RunDir; RunDir.open(sys.argv[1], 's', {}); "
        "print('held', flush=True); time.sleep(60)"), str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        (out / "_tmp.x.part-0.parquet").write_text("the live run's file")
        with pytest.raises(FolderBusyError, match=f"another run is writing this folder \\(pid {holder.pid}"):
            RunDir.open(out, "s", {})
        assert (out / "_tmp.x.part-0.parquet").exists()  # never deleted under a live run
    finally:
        holder.kill()
        holder.wait()
    RunDir.open(out, "s", {})  # the OS dropped the dead run's lock
    assert not (out / "_tmp.x.part-0.parquet").exists()
    rundir.release_lock(out)


@pytest.mark.parametrize("where", ["disk", "s3"])
def test_recorded_files_refuses_a_folder_whose_named_files_are_gone(tmp_path, where, request):
    from core import atomic, storage
    out = storage.path(str(tmp_path / "out") if where == "disk" else request.getfixturevalue("s3") + "/out")
    rd = RunDir.open(out, "download", {})
    for name in ("00000.tar", "00001.tar"):
        atomic.write_bytes(out / name, b"x")
    rd.mark_done("00000", {"files": ["00000.tar", "00001.tar", "_ledger/00000.parquet"]})
    assert [p.name for p in rundir.recorded_files(out, ".tar")] == ["00000.tar", "00001.tar"]
    (out / "00001.tar").unlink()
    with pytest.raises(UserError, match=r"1 of the 2 files its records name are gone \(first: 00001.tar\); "
                                         r"rerun the `download` command"):
        rundir.recorded_files(out, ".tar")
    atomic.write_json(out / rundir.STATS, {"parts": ["00000.tar", "00001.tar"]})  # finished: the record names them
    with pytest.raises(UserError, match="00001.tar"):
        rundir.recorded_files(out, ".tar")


def test_a_damaged_completion_record_is_one_line(tmp_path):
    rd = RunDir.open(tmp_path / "out", "dedup", {})
    (rd.path / rundir.STATS).write_text('{"rows_in": 4, "ke')
    with pytest.raises(UserError, match=r"_stats.json: unreadable \(.*\); rerun the `dedup` command that wrote"):
        rundir.check_finished(rd.path)


def test_an_output_folder_a_step_must_not_write_into_is_refused(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.parquet").write_bytes(b"x")
    for out, says in ((tmp_path / "in", "is the input"), (tmp_path / "in" / "sub", "is inside the input"),
                      (tmp_path, "holds the input")):
        with pytest.raises(UserError, match=says):
            RunDir.open(out, "dedup", {}, inputs=[tmp_path / "in"])
    (tmp_path / "link").symlink_to(tmp_path / "in")
    with pytest.raises(UserError, match="is inside the input"):
        RunDir.open(tmp_path / "link" / "out", "dedup", {}, inputs=[tmp_path / "in"])
    with pytest.raises(UserError, match="is inside the input"):  # a glob: its folder
        RunDir.open(tmp_path / "in" / "sub", "dedup", {}, inputs=[str(tmp_path / "in" / "*.parquet")])
    RunDir.open(tmp_path / "out", "dedup", {}, inputs=[tmp_path / "in" / "a.parquet", str(tmp_path / "in" / "*.parquet")])
    RunDir.open(tmp_path / "in2", "dedup", {}, inputs=[tmp_path / "in" / "a.parquet"])  # beside one input file
    # a folder of someone else's files: the step would delete its parquet files
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.parquet").write_bytes(b"x")
    with pytest.raises(UserError, match=r"holds files \(notes.parquet\) but is no step's output folder"):
        RunDir.open(tmp_path / "mine", "dedup", {})
    assert (tmp_path / "mine" / "notes.parquet").exists()
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / rundir.LOCK).write_text("")  # a run killed before it wrote its config
    RunDir.open(tmp_path / "empty", "dedup", {})
    (tmp_path / "afile").write_text("x")
    with pytest.raises(UserError, match="is a file"):
        RunDir.open(tmp_path / "afile" / "sub", "dedup", {})


def test_a_folder_where_no_unit_finished_takes_new_settings(tmp_path, capfd):
    # e.g. pretokenize stopped by a bad tokenizer before its first shard: the fixed rerun may go on
    RunDir.open(tmp_path / "out", "pretokenize", {"vq_sha256": "e3b0"})
    rd = RunDir.open(tmp_path / "out", "pretokenize", {"vq_sha256": "4db7"})
    assert "the earlier run here (other settings) left no output; starting afresh" in capfd.readouterr().err
    assert yaml.safe_load((tmp_path / "out" / "_config.yaml").read_text())["config"] == {"vq_sha256": "4db7"}
    rd.mark_done("00000")  # now it holds output: other settings are refused again
    with pytest.raises(ConfigMismatchError, match="vq_sha256"):
        RunDir.open(tmp_path / "out", "pretokenize", {"vq_sha256": "e3b0"})
    # a run folder the trainer keeps (checkpoints, no markers) never takes other settings
    RunDir.open(tmp_path / "train", "train.debug", {"lr": 1}, own_folder=False)
    with pytest.raises(ConfigMismatchError, match="lr"):
        RunDir.open(tmp_path / "train", "train.debug", {"lr": 2}, own_folder=False)
