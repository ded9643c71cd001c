"""Input listing, validation and column resolution shared by the metadata steps."""
from __future__ import annotations

import duckdb
import mmh3
import pyarrow as pa
import pytest

from curate.metadata import io as mio
from metadata_data import row, write


def test_list_inputs_file_folder_glob_skips_bookkeeping(tmp_path):
    for name in ("b.parquet", "a.parquet", "sub/c.parquet", "_ledger/x.parquet", "_tmp.1.d.parquet", ".hidden.parquet", "notes.txt"):
        p = tmp_path / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"")
    names = lambda ps: [p.relative_to(tmp_path).as_posix() for p in ps]  # noqa: E731
    assert names(mio.list_inputs(tmp_path)) == ["a.parquet", "b.parquet", "sub/c.parquet"]
    assert names(mio.list_inputs(f"{tmp_path}/*.parquet")) == ["a.parquet", "b.parquet"]
    assert names(mio.list_inputs(tmp_path / "b.parquet")) == ["b.parquet"]
    with pytest.raises(mio.MetadataError, match="input not found"):
        mio.list_inputs(tmp_path / "nope")
    with pytest.raises(mio.MetadataError, match="no parquet files"):
        mio.list_inputs(tmp_path / "_ledger" / "*.txt")


def test_inspect_errors_name_the_file(tmp_path):
    (tmp_path / "zero.parquet").write_bytes(b"")
    (tmp_path / "junk.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(mio.MetadataError, match=r"zero.parquet: empty file \(0 bytes\)"):
        mio.inspect(tmp_path / "zero.parquet")
    with pytest.raises(mio.MetadataError, match="junk.parquet: unreadable parquet file"):
        mio.inspect(tmp_path / "junk.parquet")


def test_require_and_aesthetic_resolution(tmp_path):
    f = mio.inspect(write(tmp_path / "a.parquet", [{"url": "u", "AESTHETIC_SCORE": 5.0}], schema=None))
    assert f.column("URL") == "url" and f.aesthetic == "AESTHETIC_SCORE" and f.rows == 1
    mio.require(f, ["URL", "aesthetic"])
    with pytest.raises(mio.MetadataError, match=r"a.parquet: required column 'TEXT' is missing \(columns: url, AESTHETIC_SCORE\)"):
        mio.require(f, ["TEXT"])
    g = mio.inspect(write(tmp_path / "b.parquet", [{"URL": "u"}], schema=None))
    with pytest.raises(mio.MetadataError, match="aesthetic or AESTHETIC_SCORE"):
        mio.require(g, ["aesthetic"])
    both = mio.inspect(write(tmp_path / "c.parquet", [{"AESTHETIC_SCORE": 1.0, "aesthetic": 2.0}], schema=None))
    assert both.aesthetic == "aesthetic"


def test_unified_columns_rename_and_supertypes(tmp_path):
    a = mio.inspect(write(tmp_path / "a.parquet", [{"URL": "u", "AESTHETIC_SCORE": 5.0, "w": 1}],
                          pa.schema([("URL", pa.string()), ("AESTHETIC_SCORE", pa.float32()), ("w", pa.int32())])))
    b = mio.inspect(write(tmp_path / "b.parquet", [{"URL": "v", "aesthetic": 6.0, "w": 2, "x": "y"}],
                          pa.schema([("URL", pa.string()), ("aesthetic", pa.float64()), ("w", pa.int64()), ("x", pa.string())])))
    con = mio.connect()
    cols = dict(mio.unified_columns([a, b], con))
    assert cols == {"URL": "VARCHAR", "aesthetic": "DOUBLE", "w": "BIGINT", "x": "VARCHAR"}
    proj = mio.project_sql(mio.file_columns(a), list(cols.items()))
    assert con.execute(f"SELECT {proj} FROM {mio.Scan(a, con)()}").fetchall() == [("u", 5.0, 1, None)]


def test_scan_computes_missing_hash(tmp_path):
    f = mio.inspect(write(tmp_path / "a.parquet", [{"URL": "u", "TEXT": "t"}, {"URL": None, "TEXT": "t"}], schema=None))
    con = mio.connect()
    got = con.execute(f"SELECT hash, file_row_number FROM {mio.Scan(f, con, with_hash=True)()}").fetchall()
    assert got == [(mmh3.hash64("ut")[0], 0), (mmh3.hash64("t")[0], 1)]


def test_nan_is_seen_despite_parquet_statistics(tmp_path):
    # pyarrow writes min/max statistics without NaN; duckdb 2.0.1 would fold isnan() to false.
    f = mio.inspect(write(tmp_path / "a.parquet", [row("a", similarity=0.3), row("b", similarity=float("nan"))]))
    con = mio.connect()
    assert con.execute(f"SELECT {mio.finite_sql(f, 'similarity')} IS NULL FROM {mio.Scan(f, con)()}").fetchall() == [(False,), (True,)]


def test_fingerprint_and_sql_helpers(tmp_path):
    p = write(tmp_path / "a.parquet", [row("a")])
    one = mio.fingerprint([mio.inspect(p)])
    write(tmp_path / "a.parquet", [row("a"), row("b")])
    two = mio.fingerprint([mio.inspect(p)])
    assert one["rows"] == 1 and two["rows"] == 2 and one["digest"] != two["digest"]
    assert duckdb.sql(f"SELECT {mio.sql_str(chr(39) + 'x')}, {mio.sql_list(['a', 'b'])}").fetchall() == [("'x", ["a", "b"])]
    padded = mio.sql_str(" \t u \n")
    assert duckdb.sql(f"SELECT {mio.trim_sql(padded)}").fetchall() == [("u",)]


def test_a_float_hash_column_is_refused_with_the_fix(tmp_path):
    """pandas writes int64 with nulls as float64: hashes above 2**53 then collide and every NaN
    was one dedup key (99 of 100 rows `duplicate`); a join on it matched 5 rows of 1,000."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import pytest

    from curate.metadata.io import MetadataError, load_inputs

    pq.write_table(pa.table({"URL": ["a", "b"], "TEXT": ["x", "y"], "hash": [1.0, float("nan")]}), tmp_path / "a.parquet")
    with pytest.raises(MetadataError, match=r"a.parquet: column 'hash' is double: a 64-bit hash does not fit .*Int64"):
        load_inputs(str(tmp_path))
    pq.write_table(pa.table({"URL": ["a", "b"], "TEXT": ["x", "y"], "hash": pa.array([1, None], pa.int64())}),
                   tmp_path / "a.parquet")
    assert [f.rows for f in load_inputs(str(tmp_path))] == [2]


def test_input_columns_named_like_curates_own_are_refused_up_front(tmp_path):
    """`file_row_number`, `_invalid`, `_row`, `_key`, `_keep`... made a step fail mid-run; the
    list of reserved names is checked against the SQL of every metadata module."""
    import re
    from pathlib import Path

    import pyarrow.parquet as pq

    sources = "".join(p.read_text() for p in (Path(mio.__file__).parent).glob("*.py"))
    used = set(re.findall(r"(?:AS|as) \"?(_[a-z]+)", sources)) | set(re.findall(r"\"(_[a-z]+)\":", sources))
    used |= set(re.findall(r"(?<![A-Za-z_])[a-z]\.(_[a-z]+)\b", sources)) | {"file_row_number"}
    assert used <= mio.INTERNAL_COLUMNS, sorted(used - mio.INTERNAL_COLUMNS)
    for name in ("file_row_number", "_Invalid", "_key"):
        pq.write_table(pa.table({"URL": ["a"], "TEXT": ["x"], name: [1]}), tmp_path / "a.parquet")
        with pytest.raises(mio.MetadataError, match=rf"a.parquet: column '{name}' has a name the curate steps use"):
            mio.load_inputs(str(tmp_path))
    pq.write_table(pa.table({"URL": ["a"], "TEXT": ["x"], "_id": [1], "__index_level_0__": [0]}), tmp_path / "a.parquet")
    assert [f.rows for f in mio.load_inputs(str(tmp_path))] == [1]  # other leading underscores are fine
