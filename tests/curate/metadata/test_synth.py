"""curate synth: LAION columns and dtypes, LAION's hash, planted problems, determinism."""
from __future__ import annotations

import mmh3
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from core.config import ConfigError, build
from curate.metadata import synth

LAION = pa.schema([
    ("URL", pa.string()), ("TEXT", pa.string()), ("WIDTH", pa.float64()), ("HEIGHT", pa.float64()),
    ("similarity", pa.float64()), ("hash", pa.int64()), ("punsafe", pa.float32()),
    ("pwatermark", pa.float32()), ("aesthetic", pa.float32()),
])


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    summary = synth.run(synth.SynthConfig(rows=20_000, files=4, seed=1), out / "laion", out / "caps.parquet")
    return out, summary


def test_columns_dtypes_and_hash(made):
    out, summary = made
    files = sorted((out / "laion").glob("*.parquet"))
    assert [f.name for f in files] == [f"part-{i:05d}.parquet" for i in range(4)]
    tables = [pq.read_table(f) for f in files]
    assert all(t.schema == LAION for t in tables) and sum(t.num_rows for t in tables) == 20_000
    t = tables[0]
    for r in t.slice(0, 200).to_pylist():
        assert r["hash"] == mmh3.hash64(((r["URL"] or "") + (r["TEXT"] or "")).encode())[0]


def test_planted_problems(made):
    out, _ = made
    tables = [pq.read_table(f) for f in sorted((out / "laion").glob("*.parquet"))]
    for t in tables:  # every file has null URLs and null TEXTs
        assert t["URL"].null_count >= 1 and t["TEXT"].null_count >= 1
    t = pa.concat_tables(tables)
    urls = pc.utf8_trim_whitespace(t["URL"]).to_pylist()
    owners = {}
    for i, u in enumerate(urls):
        if u is not None:
            owners.setdefault(u, set()).add(i // 5000)
    assert sum(len(s) > 1 for s in owners.values()) > 100  # the same URL in different files
    raw = t["URL"].drop_null().to_pylist()
    assert sum(u != u.strip() for u in raw) > 100  # whitespace-padded URLs
    aes = t["aesthetic"].to_numpy(zero_copy_only=False)
    assert np.isnan(aes).sum() > 10 and t["aesthetic"].null_count > 10 and t["pwatermark"].null_count > 10
    assert len(set(t["hash"].to_pylist())) < t.num_rows  # exact duplicates (same URL and caption)


def test_captions_table(made):
    out, summary = made
    caps = pq.read_table(out / "caps.parquet")
    assert caps.column_names == ["url", "caption"] and summary["captions"]["rows"] == caps.num_rows
    counts = pc.value_counts(caps["url"])
    assert max(c["counts"] for c in counts.to_pylist()) == 2  # one-to-many keys exist
    words = pc.list_value_length(pc.utf8_split_whitespace(caps["caption"])).to_numpy()
    assert words.min() < 50 <= words.max()  # some fall under the default min_words


def _bytes(table: pa.Table) -> bytes:
    """IPC bytes: equal tables give equal bytes, NaN included (Table.equals says NaN != NaN)."""
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


def test_deterministic_and_seeded():
    cfg = synth.SynthConfig(rows=1000, files=1, seed=7)
    assert _bytes(synth.make_file(cfg, 0, 1000)) == _bytes(synth.make_file(cfg, 0, 1000))
    other = synth.make_file(synth.SynthConfig(rows=1000, files=1, seed=8), 0, 1000)
    assert _bytes(synth.make_file(cfg, 0, 1000)) != _bytes(other)


def test_words_of_is_a_pure_function_of_id():
    a = synth.words_of(np.array([5, 9, 5]), seed=0, lo=3, hi=6).to_pylist()
    assert a[0] == a[2] != a[1] and all(3 <= len(s.split()) < 6 for s in a)


def test_mix_spreads_ids():
    h = synth.mix(np.arange(10_000))
    assert len(np.unique(h % np.uint64(64))) == 64


@pytest.mark.parametrize("bad", [{"files": 0}, {"dup_rate": 1.5}, {"rows": -1}])
def test_config_validation(bad):
    with pytest.raises(ConfigError):
        build(synth.SynthConfig, bad)
