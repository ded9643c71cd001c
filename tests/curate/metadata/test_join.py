"""curate join: a per-row table merged by key, hash-partitioned on both sides; the rules for
duplicate keys, missing keys and column clashes, each with its ledger entry."""
from __future__ import annotations

import pyarrow as pa
import pytest

from core.config import ConfigError, build
from core.errors import StepIncomplete, UserError
from curate.metadata import join, synth
from curate.metadata.io import MetadataError
from metadata_data import read_ledger, read_out, row, write

SCORES = pa.schema([("hash", pa.int64()), ("aesthetic_v2", pa.float32())])


def _meta(tmp_path):
    write(tmp_path / "in" / "a.parquet", [row("u1", hash=1), row("u2", hash=2), row("u3", hash=3)])
    write(tmp_path / "in" / "b.parquet", [row("u4", hash=4), row("u5", hash=None)])


def test_rules_for_duplicates_missing_keys_and_ledger(ray_local, tmp_path):
    _meta(tmp_path)
    write(tmp_path / "t" / "x.parquet", [{"hash": 1, "aesthetic_v2": 6.0}, {"hash": 2, "aesthetic_v2": 7.0},
                                         {"hash": None, "aesthetic_v2": 1.0}], SCORES)
    write(tmp_path / "t" / "y.parquet", [{"hash": 2, "aesthetic_v2": 9.0}, {"hash": 4, "aesthetic_v2": 8.0}], SCORES)
    stats = join.run(join.JoinConfig(table=str(tmp_path / "t"), partitions=3), str(tmp_path / "in"), str(tmp_path / "out"))
    got = {r["URL"]: r["aesthetic_v2"] for r in read_out(tmp_path / "out")}
    assert got == {"u1": 6.0, "u2": 7.0, "u3": None, "u4": 8.0, "u5": None}  # hash 2: the first by (file, row)
    ledger = {(r["source"][-9:], r["row"]): (r["state"], r["reason"], r["value"]) for r in read_ledger(tmp_path / "out")}
    assert ledger == {("a.parquet", 0): ("kept", None, None), ("a.parquet", 1): ("kept", "ambiguous", "2"),
                      ("a.parquet", 2): ("kept", "unmatched", None), ("b.parquet", 0): ("kept", None, None),
                      ("b.parquet", 1): ("kept", "unmatched", None)}
    assert (stats["rows_in"], stats["kept"], stats["matched"], stats["ambiguous"]) == (5, 5, 3, 1)
    assert (stats["table_rows"], stats["table_unusable"], stats["table_keys"], stats["table_duplicate_keys"]) == (5, 1, 3, 1)
    assert len(stats["parts"]) == 3  # one part per partition, every row in exactly one


def test_missing_drop_and_duplicates_error(ray_local, tmp_path):
    _meta(tmp_path)
    write(tmp_path / "t.parquet", [{"hash": 1, "aesthetic_v2": 6.0}, {"hash": 1, "aesthetic_v2": 6.5}], SCORES)
    stats = join.run(join.JoinConfig(table=str(tmp_path / "t.parquet"), missing="drop"), str(tmp_path / "in"), str(tmp_path / "d"))
    assert [r["URL"] for r in read_out(tmp_path / "d")] == ["u1"]
    assert (stats["kept"], stats["filtered"]) == (1, 4)
    assert {r["reason"] for r in read_ledger(tmp_path / "d") if r["state"] == "filtered"} == {"unmatched"}
    with pytest.raises(StepIncomplete, match="keys on several rows .* duplicates is `error`"):
        join.run(join.JoinConfig(table=str(tmp_path / "t.parquet"), duplicates="error"), str(tmp_path / "in"), str(tmp_path / "e"))
    assert not list((tmp_path / "e").glob("part-*.parquet"))


def test_column_clashes(ray_local, tmp_path):
    write(tmp_path / "in" / "a.parquet", [row("u1", hash=1, aesthetic=5.0), row("u2", hash=2, aesthetic=None),
                                          row("u3", hash=3, aesthetic=4.0)])
    table = pa.schema([("hash", pa.int64()), ("aesthetic", pa.float64())])
    write(tmp_path / "t.parquet", [{"hash": 1, "aesthetic": 7.0}, {"hash": 2, "aesthetic": 8.0}], table)
    cfg = dict(table=str(tmp_path / "t.parquet"))
    with pytest.raises(MetadataError, match="both have column 'aesthetic'; set on_clash"):
        join.run(join.JoinConfig(**cfg), str(tmp_path / "in"), str(tmp_path / "x"))
    assert not (tmp_path / "x").exists()
    join.run(join.JoinConfig(**cfg, on_clash="replace"), str(tmp_path / "in"), str(tmp_path / "r"))
    join.run(join.JoinConfig(**cfg, on_clash="keep"), str(tmp_path / "in"), str(tmp_path / "k"))
    assert [r["aesthetic"] for r in read_out(tmp_path / "r")] == [7.0, 8.0, 4.0]  # the table's where matched
    assert [r["aesthetic"] for r in read_out(tmp_path / "k")] == [5.0, 8.0, 4.0]  # the metadata's unless null


def test_text_and_integer_keys_meet_and_hash_is_computed(ray_local, tmp_path):
    # No hash column in the metadata: LAION's is computed; the table stores it as text.
    synth.run(synth.SynthConfig(rows=400, files=2, seed=4), tmp_path / "synth")
    rows = read_out(tmp_path / "synth")
    plain = pa.schema([("URL", pa.string()), ("TEXT", pa.string())])
    write(tmp_path / "in" / "a.parquet", [{"URL": r["URL"], "TEXT": r["TEXT"]} for r in rows], plain)
    text = pa.schema([("hash", pa.string()), ("score", pa.float64())])
    write(tmp_path / "t.parquet", [{"hash": str(r["hash"]), "score": float(i)} for i, r in enumerate(rows[::3])]
          + [{"hash": "not a number", "score": -1.0}], text)
    stats = join.run(join.JoinConfig(table=str(tmp_path / "t.parquet"), rows_per_partition=100), str(tmp_path / "in"),
                     str(tmp_path / "out"))
    assert stats["partitions"] == 6 and stats["table_unusable"] == 1  # ceil((400 + 135) / 100)
    first: dict[int, float] = {}
    for i, r in enumerate(rows[::3]):
        first.setdefault(r["hash"], float(i))  # duplicates: the first table row wins
    out = read_out(tmp_path / "out")
    assert sorted(r["URL"] or "" for r in out) == sorted(r["URL"] or "" for r in rows)  # every row, once
    assert all(r["score"] == first.get(r["hash"]) for r in out)
    assert stats["matched"] == sum(r["hash"] in first for r in rows)


def test_same_result_for_any_partition_count(ray_local, tmp_path):
    synth.run(synth.SynthConfig(rows=600, files=3, seed=8), tmp_path / "in")
    rows = read_out(tmp_path / "in")
    write(tmp_path / "t.parquet", [{"hash": r["hash"], "aesthetic_v2": 1.0} for r in rows[::2]], SCORES)
    outs = []
    for parts in (1, 5):
        join.run(join.JoinConfig(table=str(tmp_path / "t.parquet"), partitions=parts), str(tmp_path / "in"), str(tmp_path / f"o{parts}"))
        outs.append(sorted((r["URL"] or "", r["TEXT"] or "", r["aesthetic_v2"] or 0) for r in read_out(tmp_path / f"o{parts}")))
    assert outs[0] == outs[1] and len(outs[0]) == 600


@pytest.mark.parametrize("bad,match", [
    ({}, "table: the path"),
    ({"table": "t", "duplicates": "last"}, "duplicates must be one of"),
    ({"table": "t", "missing": "skip"}, "missing must be one of"),
    ({"table": "t", "on_clash": "merge"}, "on_clash must be one of"),
])
def test_config_validation(bad, match):
    with pytest.raises(ConfigError, match=match):
        build(join.JoinConfig, bad)


@pytest.mark.parametrize("columns", [[], ["AESTHETIC_SCORE"]])
def test_a_tables_aesthetic_score_column_merges_as_aesthetic(ray_local, tmp_path, columns):
    """LAION-aesthetics tables spell the score AESTHETIC_SCORE; it was a KeyError unless
    `--column aesthetic` was given."""
    _meta(tmp_path)
    schema = pa.schema([("hash", pa.int64()), ("AESTHETIC_SCORE", pa.float32())])
    write(tmp_path / "t.parquet", [{"hash": 1, "AESTHETIC_SCORE": 6.5}, {"hash": 4, "AESTHETIC_SCORE": 4.0}], schema)
    cfg = join.JoinConfig(table=str(tmp_path / "t.parquet"), columns=columns, on_clash="replace")
    stats = join.run(cfg, str(tmp_path / "in"), str(tmp_path / "out"))
    got = {r["URL"]: r["aesthetic"] for r in read_out(tmp_path / "out")}
    assert got == {"u1": 6.5, "u2": 5.0, "u3": 5.0, "u4": 4.0, "u5": 5.0} and stats["matched"] == 2  # replace: where matched


def test_a_lost_part_is_redone_by_a_rerun(ray_local, tmp_path):
    # The map bundles are removed once a join finishes: a part lost afterwards redoes them.
    synth.run(synth.SynthConfig(rows=300, files=2, seed=9), tmp_path / "in")
    write(tmp_path / "t.parquet", [{"hash": r["hash"], "aesthetic_v2": 2.0} for r in read_out(tmp_path / "in")], SCORES)
    cfg = join.JoinConfig(table=str(tmp_path / "t.parquet"), partitions=3)
    first = join.run(cfg, str(tmp_path / "in"), str(tmp_path / "out"))
    rows = sorted(map(str, read_out(tmp_path / "out")))
    (tmp_path / "out" / first["parts"][1]).unlink()
    (tmp_path / "out" / first["ledger"][2]).unlink()
    assert join.run(cfg, str(tmp_path / "in"), str(tmp_path / "out")) == first
    assert sorted(map(str, read_out(tmp_path / "out"))) == rows and len(rows) == 300
    assert len(read_ledger(tmp_path / "out")) == 300 and not (tmp_path / "out" / "_work").exists()


def test_a_uint64_key_matches_the_signed_hash_of_the_same_bits(ray_local, tmp_path):
    # mmh3.hash64(..., signed=False) gives LAION's hash as uint64: half the values are >= 2**63.
    synth.run(synth.SynthConfig(rows=200, files=1, seed=4), tmp_path / "in")
    rows = [r["hash"] for r in read_out(tmp_path / "in")]
    hashes = list(dict.fromkeys(rows))  # synth plants duplicate rows: one table row per key
    assert any(h < 0 for h in hashes) and any(h > 0 for h in hashes)
    unsigned = pa.table({"hash": pa.array([h & (2**64 - 1) for h in hashes], pa.uint64()),
                         "aesthetic_v2": pa.array([float(i) for i in range(len(hashes))], pa.float32())})
    (tmp_path / "t").mkdir()
    import pyarrow.parquet as pq
    pq.write_table(unsigned, tmp_path / "t" / "u.parquet")
    stats = join.run(join.JoinConfig(table=str(tmp_path / "t")), str(tmp_path / "in"), str(tmp_path / "out"))
    assert (stats["matched"], stats["table_unusable"]) == (200, 0)
    want = {h: float(i) for i, h in enumerate(hashes)}
    assert sorted((r["hash"], r["aesthetic_v2"]) for r in read_out(tmp_path / "out")) == sorted((h, want[h]) for h in rows)


def test_an_output_inside_the_table_folder_is_refused(ray_local, tmp_path):
    # the table is an input too: writing into it would delete its files as abandoned attempts
    _meta(tmp_path)
    write(tmp_path / "t" / "x.parquet", [{"hash": 1, "aesthetic_v2": 6.0}], SCORES)
    for out in (tmp_path / "t", tmp_path / "t" / "out"):
        with pytest.raises(UserError, match=r"the output folder (is|is inside) the input .*/t;"):
            join.run(join.JoinConfig(table=str(tmp_path / "t")), str(tmp_path / "in"), str(out))
    assert sorted(p.name for p in (tmp_path / "t").iterdir()) == ["x.parquet"]
