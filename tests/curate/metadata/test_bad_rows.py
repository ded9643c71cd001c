"""Bad rows are rows, not crashes (issue 10 item 6): invalid UTF-8, control characters in
URLs, infinite scores, oversized captions and scores of the wrong type each give a ledger entry
with a reason; file-level problems stop the step before it writes anything, naming the file."""
from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curate.metadata import dedup, filter as flt, join
from curate.metadata import io as mio
from metadata_data import read_ledger, read_out, row, write

INF = float("inf")


def _strings(values: list[bytes | None]) -> pa.Array:
    """A string column holding `values` as raw bytes, valid UTF-8 or not (as a broken writer
    leaves them: pyarrow's own checks are bypassed)."""
    data = b"".join(v or b"" for v in values)
    offsets, n = [0], 0
    for v in values:
        n += len(v or b"")
        offsets.append(n)
    valid = pa.array([v is not None for v in values]).buffers()[1]
    return pa.Array.from_buffers(pa.string(), len(values), [valid, pa.py_buffer(pa.array(offsets, pa.int32()).buffers()[1]),
                                                            pa.py_buffer(data)])


def _write_raw(path, columns: dict[str, pa.Array]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns), path)


def _bad_utf8_file(path) -> None:
    urls = [b"http://a/ok.jpg", b"http://a/\xff\xfe.jpg", b"http://a/c.jpg", b"http://a/d.jpg"]
    texts = [b"fine", b"fine", b"caf\xc3", b"ok"]
    lic = [b"cc-by", b"cc-by", b"cc-by", b"bad\x80licence"]
    _write_raw(path, {"URL": _strings(urls), "TEXT": _strings(texts), "LICENSE": _strings(lic),
                      "aesthetic": pa.array([5.0, 5.0, 5.0, 5.0]), "pwatermark": pa.array([0.1] * 4)})


@pytest.mark.parametrize("step", ["dedup", "filter"])
def test_invalid_utf8_fails_its_row_and_is_repaired_elsewhere(ray_local, tmp_path, step):
    _bad_utf8_file(tmp_path / "in" / "a.parquet")
    write(tmp_path / "in" / "b.parquet", [row("http://a/e.jpg")])
    if step == "dedup":
        stats = dedup.run(dedup.DedupConfig(), str(tmp_path / "in"), str(tmp_path / "out"))
    else:
        stats = flt.run(flt.FilterConfig(), str(tmp_path / "in"), str(tmp_path / "out"))
    reasons = {(r["row"], r["source"].endswith("a.parquet")): (r["state"], r["reason"]) for r in read_ledger(tmp_path / "out")}
    assert reasons[(1, True)] == ("failed", "invalid UTF-8 in URL")
    assert reasons[(2, True)] == ("failed", "invalid UTF-8 in TEXT")
    assert reasons[(0, True)] == reasons[(3, True)] == ("kept", None)
    kept = {r["URL"]: r for r in read_out(tmp_path / "out")}
    assert kept["http://a/d.jpg"]["LICENSE"] == "bad\ufffdlicence"  # another column: repaired, counted
    assert stats["repaired_utf8"] == 1 and stats["rows_in"] == 5 and stats["failed"] == 2


def test_control_characters_long_text_and_wrong_types_fail_their_rows(ray_local, tmp_path):
    rows = [
        row("http://a/ok.jpg"),
        row("http://a/\x00x.jpg"), row("http://a/b\nc.jpg"), row(" http://a/padded.jpg\n"),  # padding is trimmed, not bad
        row("http://a/big.jpg", text="w " * 600_000),  # a 1.2 MB caption
        row("http://a/" + "x" * 5000),
    ]
    write(tmp_path / "in" / "a.parquet", rows)
    schema = pa.schema([("URL", pa.string()), ("TEXT", pa.string()), ("aesthetic", pa.string()), ("pwatermark", pa.float64())])
    write(tmp_path / "in" / "b.parquet", [dict(URL="http://b/1", TEXT="t", aesthetic="6.5", pwatermark=0.1),
                                          dict(URL="http://b/2", TEXT="t", aesthetic="high", pwatermark=0.1),
                                          dict(URL="http://b/3", TEXT="t", aesthetic=" ", pwatermark=0.1),  # blank: missing
                                          dict(URL="http://b/4", TEXT="t", aesthetic="NaN", pwatermark=0.1)], schema)
    ints = pa.schema([("URL", pa.int64()), ("TEXT", pa.string()), ("aesthetic", pa.float64()), ("pwatermark", pa.float64())])
    write(tmp_path / "in" / "c.parquet", [dict(URL=7, TEXT="t", aesthetic=6.0, pwatermark=0.1)], ints)
    for step, out in (("dedup", "d"), ("filter", "f")):
        if step == "dedup":
            dedup.run(dedup.DedupConfig(), str(tmp_path / "in"), str(tmp_path / out))
        else:
            flt.run(flt.FilterConfig(), str(tmp_path / "in"), str(tmp_path / out))
        got = {(r["source"][-9:], r["row"]): (r["state"], r["reason"]) for r in read_ledger(tmp_path / out)}
        assert got[("a.parquet", 1)] == got[("a.parquet", 2)] == ("failed", "control character in URL"), step
        assert got[("a.parquet", 3)][0] == "kept", step
        assert got[("a.parquet", 4)] == ("failed", f"TEXT over {mio.MAX_TEXT_BYTES} bytes"), step
        assert got[("a.parquet", 5)] == ("failed", f"URL over {mio.MAX_URL_BYTES} bytes"), step
        assert got[("b.parquet", 0)][0] == "kept" and got[("b.parquet", 1)] == ("failed", "aesthetic is not a number"), step
        missing = ("kept", None) if step == "dedup" else ("filtered", "missing:aesthetic")
        assert got[("b.parquet", 2)] == got[("b.parquet", 3)] == missing, step  # blank text as "NaN": a missing score
        assert got[("c.parquet", 0)] == ("failed", "URL is not text"), step


def test_infinite_scores_never_win_dedup_nor_pass_the_filter(ray_local, tmp_path):
    u = "http://a/x.jpg"
    write(tmp_path / "in" / "a.parquet", [
        row(u, "inf", aesthetic=INF), row(u, "real", aesthetic=5.0), row(u, "-inf", aesthetic=-INF),
        row("http://a/y.jpg", "sim", aesthetic=6.0, similarity=INF), row("http://a/y.jpg", "sim2", aesthetic=6.0, similarity=0.2),
    ])
    dedup.run(dedup.DedupConfig(), str(tmp_path / "in"), str(tmp_path / "d"))
    assert sorted(r["TEXT"] for r in read_out(tmp_path / "d")) == ["real", "sim2"]
    write(tmp_path / "f-in" / "a.parquet", [row("a", aesthetic=INF), row("b", aesthetic=5.0, pwatermark=-INF),
                                            row("c", aesthetic=5.0, pwatermark=0.1)])
    stats = flt.run(flt.FilterConfig(), str(tmp_path / "f-in"), str(tmp_path / "f"))
    assert [r["URL"] for r in read_out(tmp_path / "f")] == ["c"]
    assert stats["reasons"] == {"missing:aesthetic": 1, "missing:pwatermark": 1}


def test_min_words_counts_whitespace_separated_words(ray_local, tmp_path):
    texts = ["\tone two", "one  two", " one\u00a0two\n", "one", "\t", "a b c"]
    write(tmp_path / "in" / "a.parquet", [row(f"u{i}", text=t) for i, t in enumerate(texts)])
    flt.run(flt.FilterConfig(min_words=2), str(tmp_path / "in"), str(tmp_path / "out"))
    assert [r["value"] for r in read_ledger(tmp_path / "out") if r["state"] == "filtered"] == ["1", "0"]
    assert len(read_out(tmp_path / "out")) == 4


@pytest.mark.parametrize("names", [["URL", "TEXT", "URL"], ["URL", "TEXT", "url"]])
def test_duplicate_column_names_stop_before_anything_is_written(ray_local, tmp_path, names):
    write(tmp_path / "in" / "a.parquet", [row("u")])
    bad = tmp_path / "in" / "b.parquet"
    pq.write_table(pa.table([pa.array(["u"]), pa.array(["t"]), pa.array(["v"])], names=names), bad)
    for run, cfg in ((dedup.run, dedup.DedupConfig()), (flt.run, flt.FilterConfig()),
                     (join.run, join.JoinConfig(table=str(tmp_path / "in" / "a.parquet")))):
        with pytest.raises(mio.MetadataError, match=rf"{bad}: two columns named"):
            run(cfg, str(tmp_path / "in"), str(tmp_path / "out"))
        assert not (tmp_path / "out").exists()


def test_a_file_unreadable_past_its_footer_is_named(ray_local, tmp_path):
    # A footer that reads but pages that do not: the task's error names the file.
    good = write(tmp_path / "src" / "a.parquet", [row(f"http://a/{i}", text="t" * 50) for i in range(2000)])
    data = bytearray(good.read_bytes())
    data[200:4000] = b"\x00" * 3800  # inside the first column's pages
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.parquet").write_bytes(bytes(data))
    from core.errors import StepIncomplete
    with pytest.raises(StepIncomplete, match="a.parquet"):
        flt.run(flt.FilterConfig(), str(tmp_path / "in"), str(tmp_path / "out"))
