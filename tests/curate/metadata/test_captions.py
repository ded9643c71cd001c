"""curate captions: normalisation, min words, one-to-many resolution, join keys, rows in = rows out."""
from __future__ import annotations

import pyarrow as pa
import pytest

from core.config import ConfigError, build
from core.errors import UserError
from curate.metadata import captions
from curate.metadata.io import MetadataError
from metadata_data import read_ledger, read_out, row, write

LONG = " ".join(f"w{i}" for i in range(60))  # 60 words


def test_normalise_nfc_whitespace_and_word_count():
    raw = ["  cafe\u0301\t\tau\u00a0lait \n", "", "   ", None, "one", " a  b\tc\n", "plain ascii words", "x\u2003y"]
    text, words = captions.normalise(pa.chunked_array([raw[:3], raw[3:]]))
    assert text.to_pylist() == ["caf\u00e9 au lait", "", "", None, "one", "a b c", "plain ascii words", "x y"]
    assert words.to_pylist() == [3, 0, 0, None, 1, 3, 3, 2]
    clean, n = captions.normalise(pa.array(["all clean here"]))  # the fast path
    assert clean.to_pylist() == ["all clean here"] and n.to_pylist() == [3]


def _caps(path, rows):
    return write(path, rows, pa.schema([("url", pa.string()), ("caption", pa.string())]))


def test_join_resolution_and_counts(ray_local, tmp_path):
    write(tmp_path / "in" / "a.parquet", [row("u1"), row(" u2 "), row("u3"), row("u4"), row(None)])
    write(tmp_path / "in" / "b.parquet", [row("u1", "again")])
    _caps(tmp_path / "caps" / "c.parquet", [
        {"url": "u1", "caption": LONG},
        {"url": "u1", "caption": LONG + " extra"},  # longer: wins
        {"url": "u2", "caption": "b " + LONG},
        {"url": "u2", "caption": "a " + LONG},  # same length: lexicographically first wins
        {"url": "u3", "caption": "too short"},  # below min_words: not used
        {"url": "u9", "caption": LONG},  # matches nothing
    ])
    _caps(tmp_path / "caps" / "d.parquet", [{"url": "u4 ", "caption": "  " + LONG.replace(" ", " \t ")}])
    cfg = captions.CaptionsConfig(captions=str(tmp_path / "caps"))
    stats = captions.run(cfg, str(tmp_path / "in"), str(tmp_path / "out"))
    got = [(r["URL"], r["TEXT"], r["long_caption"]) for r in read_out(tmp_path / "out")]
    assert got == [
        ("u1", "a photo", LONG + " extra"), (" u2 ", "a photo", "a " + LONG), ("u3", "a photo", None),
        ("u4", "a photo", LONG), (None, "a photo", None), ("u1", "again", LONG + " extra"),
    ]
    assert (stats["rows_in"], stats["kept"], stats["matched"]) == (6, 6, 4)
    assert (stats["one_to_many_keys"], stats["too_short"], stats["keys"]) == (2, 1, 4)
    assert stats["match_rate"] == pytest.approx(4 / 6, abs=1e-6)
    assert {r["state"] for r in read_ledger(tmp_path / "out")} == {"kept"}


def test_join_on_hash_keeps_existing_long_caption(ray_local, tmp_path):
    schema = pa.schema([("URL", pa.string()), ("TEXT", pa.string()), ("hash", pa.int64()), ("long_caption", pa.string())])
    write(tmp_path / "in" / "a.parquet", [dict(URL="a", TEXT="t", hash=1, long_caption="old"),
                                          dict(URL="b", TEXT="t", hash=2, long_caption="old")], schema)
    write(tmp_path / "caps.parquet", [{"hash": "2", "text": LONG}], pa.schema([("hash", pa.string()), ("text", pa.string())]))
    cfg = captions.CaptionsConfig(captions=str(tmp_path / "caps.parquet"), join_on="hash")
    captions.run(cfg, str(tmp_path / "in"), str(tmp_path / "out"))
    assert [r["long_caption"] for r in read_out(tmp_path / "out")] == ["old", LONG]


def test_missing_columns_are_named(ray_local, tmp_path):
    write(tmp_path / "in" / "a.parquet", [row("a")])
    caps = _caps(tmp_path / "caps.parquet", [{"url": "a", "caption": LONG}])
    with pytest.raises(MetadataError, match="required column 'sha256' is missing"):
        captions.run(captions.CaptionsConfig(captions=str(caps), join_on="sha256"), str(tmp_path / "in"), str(tmp_path / "o1"))
    with pytest.raises(MetadataError, match=rf"{caps}: required column 'blurb'"):
        captions.run(captions.CaptionsConfig(captions=str(caps), caption_column="blurb"), str(tmp_path / "in"), str(tmp_path / "o2"))
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()



def test_a_caption_column_that_is_not_text_is_named(ray_local, tmp_path):
    """An int64 `caption` column was read as 0% matched, every row `too_short`."""
    write(tmp_path / "in" / "a.parquet", [row("a")])
    caps = write(tmp_path / "caps.parquet", [{"url": "a", "caption": 7}], pa.schema([("url", pa.string()), ("caption", pa.int64())]))
    with pytest.raises(MetadataError, match=rf"{caps}: caption column 'caption' is int64, not text"):
        captions.run(captions.CaptionsConfig(captions=str(caps)), str(tmp_path / "in"), str(tmp_path / "o"))
    assert not (tmp_path / "o").exists()

def test_config_validation():
    with pytest.raises(ConfigError, match="caption table is required"):
        build(captions.CaptionsConfig, {})
    with pytest.raises(ConfigError, match="join_on must be one of"):
        build(captions.CaptionsConfig, {"captions": "x", "join_on": "md5"})


def test_an_output_inside_the_caption_folder_is_refused(ray_local, tmp_path):
    write(tmp_path / "in" / "a.parquet", [row("u1")])
    _caps(tmp_path / "caps" / "c.parquet", [{"url": "u1", "caption": LONG}])
    with pytest.raises(UserError, match=r"the output folder is inside the input .*/caps;"):
        captions.run(captions.CaptionsConfig(captions=str(tmp_path / "caps")), str(tmp_path / "in"),
                     str(tmp_path / "caps" / "out"))
    assert sorted(p.name for p in (tmp_path / "caps").iterdir()) == ["c.parquet"]
