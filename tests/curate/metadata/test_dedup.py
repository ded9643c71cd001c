"""curate dedup: semantics against a plain-Python reference, keep rule, keys, determinism,
ledger, reruns, bad inputs, and a kill-and-rerun through the real CLI."""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import mmh3
import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from core.rundir import ConfigMismatchError
from curate.metadata import dedup, synth
from curate.metadata.io import MetadataError
from metadata_data import nan_to_none, read_ledger, read_out, row, write

WS = " \t\n\r\x0b\x0c"
ROOT = Path(__file__).resolve().parents[3]


def reference(folder: Path) -> tuple[dict[tuple[str, int], int], set[tuple[str, int]], dict[tuple[str, int], str]]:
    """Plain-Python dedup by trimmed URL: (duplicate -> kept hash, kept ids, failed id -> reason)."""
    groups: dict[str, list] = {}
    failed = {}
    for path in sorted(str(p.resolve()) for p in folder.glob("*.parquet")):
        for i, r in enumerate(pq.read_table(path).to_pylist()):
            reason = ("null URL" if r["URL"] is None else "empty URL" if r["URL"].strip(WS) == ""
                      else "null TEXT" if r["TEXT"] is None else None)
            if reason:
                failed[(path, i)] = reason
                continue
            groups.setdefault(r["URL"].strip(WS), []).append((path, i, r))

    def rank(t):
        a, s = nan_to_none(t[2]["aesthetic"]), nan_to_none(t[2]["similarity"])
        return (a is None, -(a or 0), s is None, -(s or 0), t[2]["hash"], t[0], t[1])

    dup, kept = {}, set()
    for rows in groups.values():
        best = min(rows, key=rank)
        kept.add(best[:2])
        dup.update({t[:2]: best[2]["hash"] for t in rows if t[:2] != best[:2]})
    return dup, kept, failed


def content(rows: list[dict]) -> Counter:
    return Counter(tuple((k, nan_to_none(v)) for k, v in sorted(r.items())) for r in rows)


@pytest.fixture(scope="module")
def laion(tmp_path_factory) -> Path:
    """4 files, 30% duplicates spread across them, NaN/null scores, null URL/TEXT rows."""
    folder = tmp_path_factory.mktemp("laion")
    synth.run(synth.SynthConfig(rows=4000, files=4, dup_rate=0.3, missing_rate=0.1, null_rate=0.002, seed=3), folder)
    return folder


def test_dedup_matches_reference_across_files_on_ray(ray_local, laion, tmp_path):
    stats = dedup.run(dedup.DedupConfig(buckets=3), str(laion), str(tmp_path / "out"))
    dup, kept, failed = reference(laion)
    ledger = read_ledger(tmp_path / "out")
    by_state = {s: {(r["source"], r["row"]): r for r in ledger if r["state"] == s} for s in ("kept", "duplicate", "failed")}
    assert set(by_state["kept"]) == kept
    assert {k: r["ref"] for k, r in by_state["duplicate"].items()} == dup  # the kept row's hash, an int64
    assert {k: r["reason"] for k, r in by_state["failed"].items()} == failed
    assert {r["reason"] for r in by_state["duplicate"].values()} == {"url"}
    assert len({src for src, _ in dup}) == 4 and len(dup) > 500  # duplicates really span the 4 files
    assert stats["rows_in"] == 4000 == stats["kept"] + stats["duplicate"] + stats["failed"]
    assert stats["kept"] == len(read_out(tmp_path / "out")) == len(kept)
    assert sorted((tmp_path / "out").glob("*.parquet")) == [tmp_path / "out" / f"part-{i:05d}.parquet" for i in range(4)]  # one per input file
    assert (tmp_path / "out" / "_stats.json").exists() and (tmp_path / "out" / "_config.yaml").exists()
    assert not (tmp_path / "out" / "_work").exists()


def test_keep_rule_and_url_trimming(ray_local, tmp_path):
    u = "https://x.org/a.jpg"
    write(tmp_path / "in" / "a.parquet", [
        row(u, "one", aesthetic=5.0, similarity=0.9),
        row(f"  {u}\n", "two", aesthetic=6.0, similarity=0.1),  # best aesthetic, padded URL
        row(u, "three", aesthetic=float("nan"), similarity=0.99),  # NaN counts as missing, not as max
        row("https://x.org/b.jpg", "b1", aesthetic=5.0, similarity=0.2),
        row("https://x.org/b.jpg", "b2", aesthetic=5.0, similarity=0.3),  # similarity breaks the tie
        row("https://x.org/c.jpg", "c", aesthetic=5.0, similarity=0.3, hash=7),
        row("https://x.org/c.jpg", "c", aesthetic=5.0, similarity=0.3, hash=-7),  # smallest hash
    ])
    write(tmp_path / "in" / "b.parquet", [row(u, "four", aesthetic=None, similarity=1.0)])
    dedup.run(dedup.DedupConfig(), str(tmp_path / "in"), str(tmp_path / "out"))
    kept = {r["TEXT"]: r for r in read_out(tmp_path / "out")}
    assert set(kept) == {"two", "b2", "c"} and kept["c"]["hash"] == -7
    assert kept["two"]["URL"] == f"  {u}\n"  # the kept row is written as it was
    refs = {r["key"]: r["ref"] for r in read_ledger(tmp_path / "out") if r["state"] == "duplicate"}
    assert refs[row(u, "one")["hash"]] == row(f"  {u}\n", "two")["hash"]
    assert refs[7] == -7


@pytest.mark.parametrize("key,expected", [("url_text", {"a", "b", "c"}), ("hash", {"a", "b", "c"})])
def test_keys(ray_local, tmp_path, key, expected):
    write(tmp_path / "in" / "a.parquet", [
        row("u1", "t", aesthetic=5.0, hash=1), row(" u1 ", "t", aesthetic=6.0, hash=1),
        row("u1", "other", aesthetic=4.0, hash=2), row("u2", "t", aesthetic=4.0, hash=3),
    ])
    dedup.run(dedup.DedupConfig(key=key), str(tmp_path / "in"), str(tmp_path / "out"))
    kept = sorted((r["URL"], r["TEXT"]) for r in read_out(tmp_path / "out"))
    # url_text trims the URL, so " u1 "+t duplicates u1+t; hash 1 is shared by the same two rows
    assert kept == [(" u1 ", "t"), ("u1", "other"), ("u2", "t")]


def test_result_independent_of_file_layout_and_buckets(ray_local, laion, tmp_path):
    rows = [r for f in sorted(laion.glob("*.parquet")) for r in pq.read_table(f).to_pylist()]
    schema = pq.read_schema(next(laion.glob("*.parquet")))
    for i in range(5):  # the same rows, reversed and dealt into 5 files with other names
        write(tmp_path / "in" / f"z{i}.parquet", rows[::-1][i::5], schema)
    dedup.run(dedup.DedupConfig(buckets=1), str(laion), str(tmp_path / "a"))
    dedup.run(dedup.DedupConfig(buckets=7), str(tmp_path / "in"), str(tmp_path / "b"))
    assert content(read_out(tmp_path / "a")) == content(read_out(tmp_path / "b"))


def test_rerun_skips_done_tasks_and_refuses_other_config(ray_local, laion, tmp_path):
    out = tmp_path / "out"
    first = dedup.run(dedup.DedupConfig(buckets=2), str(laion), str(out))
    mtimes = {p: p.stat().st_mtime_ns for p in out.glob("*.parquet")}
    again = dedup.run(dedup.DedupConfig(buckets=2, memory="512MB"), str(laion), str(out))  # exec knobs may change
    assert again == first and mtimes == {p: p.stat().st_mtime_ns for p in out.glob("*.parquet")}
    marker = json.loads((out / "_done" / "p2-00001.json").read_text())  # each task records its own cost
    assert marker["task_seconds"] > 0 and marker["task_cpu_seconds"] > 0
    with pytest.raises(ConfigMismatchError, match="key"):
        dedup.run(dedup.DedupConfig(buckets=2, key="hash"), str(laion), str(out))


def test_a_folder_of_another_format_is_refused(ray_local, laion, tmp_path, monkeypatch):
    # A folder left by a version that wrote other intermediate files or ledger types is never
    # finished with today's code: the format is part of the folder's identity.
    from curate.metadata import exec as mx
    monkeypatch.setattr(mx, "FORMAT", mx.FORMAT - 1)
    dedup.run(dedup.DedupConfig(buckets=2), str(laion), str(tmp_path / "out"))
    monkeypatch.undo()
    with pytest.raises(ConfigMismatchError, match="format"):
        dedup.run(dedup.DedupConfig(buckets=2), str(laion), str(tmp_path / "out"))


def test_missing_hash_is_computed_and_aesthetic_score_is_read(ray_local, tmp_path):
    schema = pa.schema([("URL", pa.string()), ("TEXT", pa.string()), ("AESTHETIC_SCORE", pa.float64()), ("extra", pa.int32())])
    write(tmp_path / "in" / "a.parquet", [dict(URL="u", TEXT="t", AESTHETIC_SCORE=9.0, extra=1)], schema)
    write(tmp_path / "in" / "b.parquet", [row("u", "x", aesthetic=5.0)])
    dedup.run(dedup.DedupConfig(), str(tmp_path / "in"), str(tmp_path / "out"))
    (kept,) = read_out(tmp_path / "out")
    assert kept["TEXT"] == "t" and kept["aesthetic"] == 9.0 and kept["extra"] == 1
    assert kept["hash"] == mmh3.hash64("ut".encode())[0]


def test_empty_and_all_null_files(ray_local, tmp_path):
    write(tmp_path / "in" / "empty.parquet", [])
    write(tmp_path / "in" / "nulls.parquet", [row(None, "t"), row("u", None), row("  ", "t")])
    stats = dedup.run(dedup.DedupConfig(), str(tmp_path / "in"), str(tmp_path / "out"))
    assert (stats["rows_in"], stats["failed"], stats["kept"]) == (3, 3, 0)
    assert sorted(r["reason"] for r in read_ledger(tmp_path / "out")) == ["empty URL", "null TEXT", "null URL"]
    assert read_out(tmp_path / "out") == []


def test_missing_column_fails_before_writing(ray_local, tmp_path):
    write(tmp_path / "in" / "a.parquet", [row("u", "t")])
    bad = write(tmp_path / "in" / "b.parquet", [{"URL": "u", "caption": "t"}], schema=None)
    with pytest.raises(MetadataError, match=rf"{bad}.*'TEXT'"):
        dedup.run(dedup.DedupConfig(), str(tmp_path / "in"), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_unreadable_parquet_is_named(ray_local, tmp_path):
    write(tmp_path / "in" / "a.parquet", [row("u", "t")])
    (tmp_path / "in" / "broken.parquet").write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(MetadataError, match="broken.parquet: unreadable parquet"):
        dedup.run(dedup.DedupConfig(), str(tmp_path / "in"), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def _plain(path: Path) -> list[dict]:
    return [{k: nan_to_none(v) for k, v in r.items()} for r in pq.read_table(path).to_pylist()]


def _descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def test_kill_mid_run_then_rerun_equals_uninterrupted(ray_local, tmp_path):
    data = tmp_path / "in"
    synth.run(synth.SynthConfig(rows=60_000, files=6, dup_rate=0.3, seed=11), data)
    out = tmp_path / "killed"
    cmd = [str(ROOT / ".venv/bin/curate"), "dedup", "-i", str(data), "-o", str(out), "--buckets", "16"]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, start_new_session=True)
    total, done, deadline = 6 + 16 + 6, 0, time.time() + 120
    try:
        while time.time() < deadline and proc.poll() is None:
            done = len(list((out / "_done").glob("*.json"))) if (out / "_done").exists() else 0
            if done >= 3:
                break
            time.sleep(0.005)
    finally:
        family = [psutil.Process(proc.pid), *_descendants(proc.pid)]
        for p in family:  # the CLI and the local Ray it started (raylet, GCS, workers)
            try:
                p.send_signal(signal.SIGKILL)
            except psutil.NoSuchProcess:
                pass
        proc.wait()
    done = len(list((out / "_done").glob("*.json")))
    assert 0 < done < total, f"the kill must land mid-run ({done}/{total} tasks done)"
    resumed = dedup.run(dedup.DedupConfig(buckets=16), str(data), str(out))
    clean = dedup.run(dedup.DedupConfig(buckets=16), str(data), str(tmp_path / "clean"))
    assert resumed == clean
    for i in range(6):
        name = f"part-{i:05d}.parquet"
        assert _plain(out / name) == _plain(tmp_path / "clean" / name)  # same rows, same order
    assert read_ledger(out) == read_ledger(tmp_path / "clean")
    assert not list(out.rglob("_tmp.*"))


@pytest.mark.parametrize("url", [None, "", " ", "\t\n", "a", " a", "a ", "\ta\n", "\x0bé\x0c", "é", "a b", "日本 "])
def test_url_key_equals_full_trim(url):
    import duckdb
    from curate.metadata import io as mio
    con = duckdb.connect()
    got, want = con.execute(f"SELECT {dedup.url_key_sql('u')}, {mio.trim_sql('u')} FROM (SELECT ?::VARCHAR AS u)", [url]).fetchone()
    assert got == want


def test_parts_keep_input_order_on_one_thread_and_on_two(ray_local, tmp_path):
    # Several row groups, so two duckdb threads really probe the join in parallel (with two
    # threads and no ORDER BY, duckdb appended row groups out of order); one thread streams.
    import numpy as np
    n = 300_000
    i = np.arange(n)
    table = pa.table({"URL": pa.array([f"u{k}" for k in i % 260_000]), "TEXT": pa.array(["t"] * n),
                      "aesthetic": pa.array((i % 7).astype("float64")), "hash": pa.array(i, pa.int64())})
    (tmp_path / "in").mkdir()
    pq.write_table(table, tmp_path / "in" / "a.parquet", row_group_size=30_000)
    for threads in (1, 2):
        dedup.run(dedup.DedupConfig(buckets=2, threads=threads), str(tmp_path / "in"), str(tmp_path / f"t{threads}"))
    one, two = (pq.read_table(tmp_path / f"t{t}" / "part-00000.parquet") for t in (1, 2))
    hashes = one.column("hash").to_numpy()
    assert len(hashes) == 260_000 and (np.diff(hashes) > 0).all()  # input order
    assert one.equals(two)


def test_a_part_or_ledger_lost_after_the_run_is_redone_by_a_rerun(ray_local, laion, tmp_path, capfd):
    # The bundles are gone once a run finishes, so a lost part or ledger redoes the phases
    # before it; on a disk their output is the same, so only the lost files' units write.
    out = tmp_path / "out"
    first = dedup.run(dedup.DedupConfig(buckets=3), str(laion), str(out))
    parts, ledgers = (out / "part-00002.parquet"), (out / "_ledger" / "p2-00001.parquet")
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in [*out.glob("*.parquet"), *out.glob("_ledger/*")]}
    parts.unlink()
    ledgers.unlink()
    from core.errors import UserError
    from curate.metadata import filter as mfilter
    with pytest.raises(UserError, match=r"1 of the 4 files its records name are gone \(first: part-00002.parquet\)"):
        mfilter.run(mfilter.FilterConfig(), str(out), str(tmp_path / "f"))  # the next step says what to do
    capfd.readouterr()
    again = dedup.run(dedup.DedupConfig(buckets=3), str(laion), str(out))
    err = " ".join(capfd.readouterr().err.split())
    assert "1 done unit(s) lost a file (first: p2-00001: _ledger/p2-00001.parquet is gone)" in err
    assert "1 done unit(s) lost a file (first: p3-00002: part-00002.parquet is gone)" in err
    assert "_work/" not in err
    assert again == first
    after = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in before}
    assert {p for p in before if after[p] != before[p]} == {parts} | set(out.glob("_ledger/*"))  # p2 all redone
    assert all(after[p][0] == before[p][0] for p in before)  # same bytes
    assert not (out / "_work").exists()
    assert dedup.run(dedup.DedupConfig(buckets=3), str(laion), str(out)) == first


def test_a_finished_folder_moved_or_reached_through_a_link_reruns_as_done(ray_local, laion, tmp_path):
    import shutil
    from core import rundir
    first = dedup.run(dedup.DedupConfig(buckets=3), str(laion), str(tmp_path / "a"))
    rundir.release_lock(tmp_path / "a")  # as the process that wrote it would on exit
    shutil.move(tmp_path / "a", tmp_path / "b")
    (tmp_path / "link").symlink_to(tmp_path / "b")
    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "b").glob("*.parquet")}
    for where in ("b", "link"):  # the bundles are gone: a unit that thought itself stale could not redo
        assert dedup.run(dedup.DedupConfig(buckets=3), str(laion), str(tmp_path / where)) == first
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "b").glob("*.parquet")} == before


def test_a_part_cut_short_after_the_run_is_named_then_redone(ray_local, laion, tmp_path, capfd):
    from curate.metadata import filter as mfilter
    out = tmp_path / "out"
    first = dedup.run(dedup.DedupConfig(buckets=2), str(laion), str(out))
    whole = (out / "part-00001.parquet").read_bytes()
    (out / "part-00001.parquet").write_bytes(whole[:100])
    with pytest.raises(MetadataError, match=r"part-00001.parquet: unreadable parquet file .*; rerun the `dedup` command"):
        mfilter.run(mfilter.FilterConfig(), str(out), str(tmp_path / "f"))
    capfd.readouterr()
    assert dedup.run(dedup.DedupConfig(buckets=2), str(laion), str(out)) == first
    assert f"part-00001.parquet has 100 bytes, {len(whole):,} when it was written" in " ".join(capfd.readouterr().err.split())
    assert (out / "part-00001.parquet").read_bytes() == whole
