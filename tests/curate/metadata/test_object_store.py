"""The metadata pipeline with every input and output on S3 (moto's server on loopback, found
through AWS_ENDPOINT_URL only): dedup -> filter -> captions -> join, the same rows and ledgers
as on a local disk, nothing written to the working folder, and only what the records name."""
from __future__ import annotations

import json
import os
import re

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from rich.console import Console

from core import storage
from curate import pipeline
from curate.metadata import synth

STEPS = ["dedup", "filter", "captions", "join"]


def _inputs(local, base: str) -> dict[str, str]:
    """Synth rows, a caption table and a score table (hash -> punsafe_v2), written under `base`."""
    synth.run(synth.SynthConfig(rows=3000, files=3, seed=7), local / "in", local / "caps.parquet")
    rows = pa.concat_tables([pq.read_table(p) for p in sorted((local / "in").glob("*.parquet"))])
    hashes = rows.column("hash").to_numpy()[::2]  # half the rows have a score
    pq.write_table(pa.table({"hash": hashes, "punsafe_v2": (np.abs(hashes) % 1000 / 1000).astype("float32")}),
                   local / "scores.parquet")
    if base.startswith("s3://"):
        for p in sorted(local.rglob("*.parquet")):
            storage.upload(p, storage.path(f"{base}/{p.relative_to(local)}"))
    return {"in": f"{base}/in", "caps": f"{base}/caps.parquet", "scores": f"{base}/scores.parquet"}


def _doc(paths: dict[str, str], out: str) -> dict:
    steps = ["dedup", {"step": "filter", "aesthetic": 5.0}, {"step": "captions", "captions": paths["caps"], "min_words": 30},
             {"step": "join", "table": paths["scores"], "on": "hash"}]
    return {"pipelines": {"p": {"input": paths["in"], "output": out, "steps": steps}}}


def _rows(folder: str) -> list[tuple]:
    """The step's rows as its record names them, in order (NaN compared as None)."""
    stats = json.loads(storage.path(f"{folder}/_stats.json").read_text())
    tables = []
    for name in stats["parts"]:
        fs, key = storage.arrow_fs(storage.path(f"{folder}/{name}"))
        tables.append(pq.read_table(key, filesystem=fs))
    t = pa.concat_tables(tables)
    return [tuple(None if isinstance(v, float) and v != v else v for v in r.values()) for r in t.to_pylist()]


def _plain_name(source: str) -> str:
    """A source file's name without the attempt id an object store's parts carry."""
    return re.sub(r"\.[0-9a-f]{8}\.parquet$", ".parquet", os.path.basename(source))


def _ledger(folder: str) -> list[tuple]:
    stats = json.loads(storage.path(f"{folder}/_stats.json").read_text())
    rows = []
    for name in stats["ledger"]:
        fs, key = storage.arrow_fs(storage.path(f"{folder}/{name}"))
        t = pq.read_table(key, filesystem=fs)
        rows += [(_plain_name(r["source"]), r["row"], r["state"], r["reason"], r["key"]) for r in t.to_pylist()]
    return sorted(rows, key=str)


def test_pipeline_on_s3_equals_local_and_writes_nothing_locally(ray_local, s3, tmp_path, monkeypatch):
    local_paths = _inputs(tmp_path / "data", str(tmp_path / "data"))
    s3_paths = _inputs(tmp_path / "data", s3)
    pipeline.run(_doc(local_paths, str(tmp_path / "local-out")), "p", Console(record=True))
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    results = pipeline.run(_doc(s3_paths, f"{s3}/out"), "p", Console(record=True))
    assert [r["step"] for r in results] == STEPS and results[1]["fused_into"] == "dedup"
    assert list(work.iterdir()) == []  # nothing written to the working folder
    for step in STEPS:
        remote, local = f"{s3}/out/{step}", str(tmp_path / "local-out" / step)
        assert _rows(remote) == _rows(local), step
        assert _ledger(remote) == _ledger(local), step
        stats = json.loads(storage.path(f"{remote}/_stats.json").read_text())
        listed = sorted(p.name for p in storage.path(remote).glob("*.parquet"))
        assert listed == sorted(stats["parts"]) and all(".parquet" in n for n in listed)  # nothing else is left
        assert not storage.path(f"{remote}/_work").exists()
    join = json.loads(storage.path(f"{s3}/out/join/_stats.json").read_text())
    assert 0 < join["matched"] < join["rows_in"] and join["rows_in"] == join["kept"]
    # duckdb reads the parts a local run writes as it always did
    assert duckdb.sql(f"SELECT count(*) FROM '{tmp_path}/local-out/join/*.parquet'").fetchall() == [(join["kept"],)]


def test_an_abandoned_attempt_on_s3_is_never_read_and_is_removed(ray_local, s3, tmp_path):
    # A part written by an attempt that died before its marker (an attempt-unique name no
    # record names) is neither read by the next step nor left behind.
    from curate.metadata import dedup, filter as flt
    paths = _inputs(tmp_path / "data", s3)
    dedup.run(dedup.DedupConfig(), paths["in"], f"{s3}/d")
    stale = storage.path(f"{s3}/d/part-00001.deadbeef.parquet")
    storage.upload(tmp_path / "data" / "in" / "part-00000.parquet", stale)  # not what dedup wrote
    stats = flt.run(flt.FilterConfig(), f"{s3}/d", f"{s3}/f")
    assert stats["rows_in"] == json.loads(storage.path(f"{s3}/d/_stats.json").read_text())["kept"]
    dedup.run(dedup.DedupConfig(), paths["in"], f"{s3}/d")  # a rerun (nothing to do) cleans up
    assert not stale.exists()
