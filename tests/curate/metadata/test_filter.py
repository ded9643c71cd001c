"""curate filter: thresholds, rule order, fail-closed missing scores, ledger values, range warnings."""
from __future__ import annotations

import pyarrow as pa
import pytest

from core.config import ConfigError, build
from curate.metadata import filter as flt
from curate.metadata.io import MetadataError
from metadata_data import read_ledger, read_out, row, write

NAN = float("nan")


def _run(tmp_path, rows, schema=..., **cfg):
    kwargs = {} if schema is ... else {"schema": schema}
    write(tmp_path / "in" / "a.parquet", rows, **kwargs)
    stats = flt.run(flt.FilterConfig(**cfg), str(tmp_path / "in"), str(tmp_path / "out"))
    return stats, read_out(tmp_path / "out"), read_ledger(tmp_path / "out")


def test_default_rule_is_meissonics(ray_local, tmp_path):
    rows = [
        row("u0", aesthetic=4.5, pwatermark=0.5),  # both bounds inclusive: kept
        row("u1", aesthetic=4.49, pwatermark=0.1),
        row("u2", aesthetic=9.0, pwatermark=0.51),
        row("u3", aesthetic=3.0, pwatermark=0.9),  # fails both: the first rule is recorded
        row("u4", aesthetic=NAN), row("u5", aesthetic=None), row("u6", pwatermark=None),
        row(None), row("u8", text=None),
    ]
    stats, kept, ledger = _run(tmp_path, rows)
    assert [r["URL"] for r in kept] == ["u0"]
    got = [(r["row"], r["state"], r["reason"], r["value"]) for r in ledger]
    assert got == [
        (0, "kept", None, None), (1, "filtered", "aesthetic", "4.49"), (2, "filtered", "watermark", "0.51"),
        (3, "filtered", "aesthetic", "3.0"), (4, "filtered", "missing:aesthetic", None),
        (5, "filtered", "missing:aesthetic", None), (6, "filtered", "missing:pwatermark", None),
        (7, "failed", "null URL", None), (8, "failed", "null TEXT", None),
    ]
    assert stats["reasons"] == {"aesthetic": 2, "missing:aesthetic": 2, "missing:pwatermark": 1, "watermark": 1}
    assert (stats["kept"], stats["filtered"], stats["failed"]) == (1, 6, 2)


def test_optional_rules_in_documented_order(ray_local, tmp_path):
    rows = [
        row("ok", text="three good words", punsafe=0.05, width=512, height=768, similarity=0.3),
        row("unsafe", punsafe=0.5, width=10),  # punsafe comes before min_side
        row("small", width=100, height=900),  # min_side comes before max_aspect
        row("wide", width=2000, height=500),
        row("nosim", similarity=NAN),
        row("lowsim", similarity=0.1),
        row("short", text="two  words"),
        row("empty", text="   "),
    ]
    _, kept, ledger = _run(tmp_path, rows, punsafe=0.1, min_side=256, max_aspect=3.0, similarity=0.2, min_words=3)
    assert [r["URL"] for r in kept] == ["ok"]
    assert [(r["reason"], r["value"]) for r in ledger[1:]] == [
        ("punsafe", "0.5"), ("min_side", "100.0"), ("max_aspect", "4.0"), ("missing:similarity", None),
        ("similarity", "0.1"), ("min_words", "2"), ("min_words", "0"),
    ]


def test_aesthetic_score_column_and_extra_columns(ray_local, tmp_path):
    schema = pa.schema([("URL", pa.string()), ("TEXT", pa.string()), ("AESTHETIC_SCORE", pa.float64()),
                        ("pwatermark", pa.float64()), ("hash", pa.int64()), ("my_col", pa.string())])
    rows = [dict(URL="a", TEXT="t", AESTHETIC_SCORE=6.0, pwatermark=0.1, hash=1, my_col="x"),
            dict(URL="b", TEXT="t", AESTHETIC_SCORE=2.0, pwatermark=0.1, hash=2, my_col="y")]
    _, kept, ledger = _run(tmp_path, rows, schema)
    assert kept == [dict(URL="a", TEXT="t", aesthetic=6.0, pwatermark=0.1, hash=1, my_col="x")]
    assert [r["key"] for r in ledger] == [1, 2]  # LAION's hash, as its input types it


def test_ledger_key_has_one_type_per_step(ray_local, tmp_path):
    # One file with LAION's hash, one without: the ledger's key is the int64 hash throughout
    # (null where a file has none), so the step's ledger parts read back as one table.
    import duckdb
    import pyarrow.parquet as pq
    no_hash = pa.schema([("URL", pa.string()), ("TEXT", pa.string()), ("aesthetic", pa.float64()), ("pwatermark", pa.float64())])
    write(tmp_path / "in" / "a.parquet", [row("a", aesthetic=6.0, pwatermark=0.1, hash=11)])
    write(tmp_path / "in" / "b.parquet", [dict(URL="b", TEXT="t", aesthetic=1.0, pwatermark=0.1)], schema=no_hash)
    flt.run(flt.FilterConfig(), str(tmp_path / "in"), str(tmp_path / "out"))
    parts = sorted((tmp_path / "out" / "_ledger").glob("*.parquet"))
    assert len(parts) == 2 and {str(pq.read_schema(p).field("key").type) for p in parts} == {"int64"}
    got = duckdb.sql(f"SELECT key, state, reason FROM '{tmp_path}/out/_ledger/*.parquet' ORDER BY source").fetchall()
    assert got == [(11, "kept", None), (None, "filtered", "aesthetic")]


def test_missing_column_names_file_and_column(ray_local, tmp_path):
    schema = pa.schema([("URL", pa.string()), ("TEXT", pa.string()), ("aesthetic", pa.float32())])
    path = write(tmp_path / "in" / "a.parquet", [dict(URL="a", TEXT="t", aesthetic=5.0)], schema)
    with pytest.raises(MetadataError, match=rf"{path}: required column 'pwatermark' is missing"):
        flt.run(flt.FilterConfig(), str(tmp_path / "in"), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_range_warnings():
    cfg = flt.FilterConfig(aesthetic=0.5, watermark=0.5, similarity=0.9)
    warnings = flt.range_warnings(cfg, {"aesthetic": (1.0, 9.5), "watermark": (0.0, 1.0), "similarity": (0.1, 0.4)})
    assert len(warnings) == 2
    assert "aesthetic=0.5 lies outside the observed range [1, 9.5]" in warnings[0]
    assert "similarity=0.9" in warnings[1]


def test_warning_is_printed_and_recorded(ray_local, tmp_path, capsys):
    rows = [row("a", aesthetic=5.0, pwatermark=0.0), row("b", aesthetic=NAN, pwatermark=0.9)]
    stats, kept, _ = _run(tmp_path, rows, aesthetic=0.5)
    assert "outside the observed range [5, 5]" in capsys.readouterr().err
    assert len(stats["warnings"]) == 1 and len(kept) == 1  # NaN is not part of the range


@pytest.mark.parametrize("bad,match", [
    ({"watermark": 2.0}, "watermark is a probability"),
    ({"max_aspect": 0.5}, "max_aspect"),
    ({"min_words": -1}, "min_words"),
    ({"aesthetics": 4.5}, "unknown key 'aesthetics'"),
])
def test_config_validation(bad, match):
    with pytest.raises(ConfigError, match=match):
        build(flt.FilterConfig, bad)


def test_decision_sql_without_rules_keeps_everything():
    assert flt.decision_sql({}) == ("NULL::VARCHAR", "NULL::VARCHAR")
    assert list(flt.FilterConfig(punsafe=0.2).active()) == ["aesthetic", "watermark", "punsafe"]


def test_blank_sql_equals_trimmed_empty():
    # The fast blank test must agree with trim(URL, URL_WHITESPACE) = '' on every kind of string.
    import duckdb

    from curate.metadata import io as mio
    con = duckdb.connect()
    samples = ["", " ", " \t\n\r", "\x0b\x0c", "a", " a", "a ", "\t x", "é", " é ", "\u00a0", "\u00a0 ", "\n\n"]
    for s in samples:
        slow, fast = con.execute(f"SELECT {mio.trim_sql('$1')} = '', {mio.blank_sql('$1')}", [s]).fetchone()
        assert slow == fast, repr(s)


def test_float16_scores_are_read_and_their_ranges_decoded(ray_local, tmp_path):
    """pyarrow writes float16 with Float16 statistics as 2 raw bytes, and duckdb has no Arrow
    half-float: both crashed every step before any row was read."""
    import numpy as np
    import pyarrow.parquet as pq

    from curate.metadata.io import inspect
    from core import storage

    from metadata_data import SCHEMA

    half = pa.schema([f.with_type(pa.float16()) if f.name in ("aesthetic", "pwatermark") else f for f in SCHEMA])
    rows = [row("u1", aesthetic=6.0), row("u2", aesthetic=4.0), row("u3", aesthetic=5.0, pwatermark=0.75)]
    stats, out, ledger = _run(tmp_path, rows, schema=half)
    assert [r["URL"] for r in out] == ["u1"] and stats["kept"] == 1
    assert {r["reason"] for r in ledger if r["state"] == "filtered"} == {"aesthetic", "watermark"}
    assert pq.read_schema(tmp_path / "in" / "a.parquet").field("aesthetic").type == pa.float16()
    ranges = {name: (lo, hi) for name, lo, hi in inspect(storage.path(tmp_path / "in" / "a.parquet")).ranges}
    assert ranges["aesthetic"] == (4.0, 6.0) and np.isclose(ranges["pwatermark"][1], 0.75)
