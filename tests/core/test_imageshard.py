"""core.imageshard: write/read round trip, unsafe members refused, truncation survived."""
from __future__ import annotations

import io
import tarfile

import pytest

from core.imageshard import ReadReport, Sample, iter_shard, list_shards, read_samples, write_shard


def samples(n: int) -> list[Sample]:
    return [Sample(f"0000{i}", bytes([i]) * 700, "jpg", f"cap {i}", {"i": i}) for i in range(n)]


def raw_tar(path, members, kind=tarfile.REGTYPE):
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.type = len(data), kind
            tar.addfile(info, io.BytesIO(data))


def test_round_trip(tmp_path):
    assert write_shard(tmp_path / "00000.tar", samples(3)) == 3
    report = ReadReport("x")
    got = list(iter_shard(tmp_path / "00000.tar", report))
    assert [(s.key, s.image, s.image_ext, s.caption, s.meta) for s in got] == [
        (s.key, s.image, "jpg", s.caption, s.meta) for s in samples(3)]
    assert report.samples == 3 and report.damaged is None and not report.refused


def test_list_shards_skips_bookkeeping(tmp_path):
    for name in ("00001.tar", "00000.tar", "_tmp.x.tar", ".hidden.tar", "a.parquet"):
        (tmp_path / name).write_bytes(b"")
    assert [p.name for p in list_shards(tmp_path)] == ["00000.tar", "00001.tar"]
    with pytest.raises(FileNotFoundError):
        list_shards(tmp_path / "missing")


def test_absolute_and_dotdot_members_refused(tmp_path):
    raw_tar(tmp_path / "x.tar", [("/abs/0.jpg", b"a"), ("../1.jpg", b"b"), ("a/../../2.jpg", b"c"), ("3.jpg", b"d")])
    report = ReadReport("x")
    got = list(iter_shard(tmp_path / "x.tar", report))
    assert [s.key for s in got] == ["3"]
    assert [r for _, r in report.refused] == ["absolute path", "path traversal (..)", "path traversal (..)"]
    assert not (tmp_path.parent / "1.jpg").exists()


def test_links_refused(tmp_path):
    with tarfile.open(tmp_path / "x.tar", "w") as tar:
        link = tarfile.TarInfo("0.jpg")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(link)
    report = ReadReport("x")
    assert list(iter_shard(tmp_path / "x.tar", report)) == []
    assert report.refused == [("0.jpg", "not a regular file")]


@pytest.mark.parametrize("frac", [0.15, 0.33, 0.5, 0.71, 0.9])
def test_truncated_tar_keeps_whole_samples_and_reports_damage(tmp_path, frac):
    write_shard(tmp_path / "00000.tar", samples(6))
    data = (tmp_path / "00000.tar").read_bytes()
    end = 6 * 3 * 512 + sum(  # where the end-of-archive marker starts
        -(-len(m) // 512) * 512 for s in samples(6) for m in (s.image, s.caption.encode(), b'{"i": 0}'))
    cut = int(end * frac) // 512 * 512 if frac == 0.5 else int(end * frac)  # a member boundary too
    (tmp_path / "t.tar").write_bytes(data[:cut])
    report = ReadReport("t")
    got = list(iter_shard(tmp_path / "t.tar", report))
    assert report.damaged, "a truncated tar must be reported as damaged"
    # every yielded image is whole; only the sample the cut went through may lack .txt/.json
    assert len(got) <= 6 and all(s.image == bytes([int(s.key[-1])]) * 700 for s in got)
    assert all(s.caption and s.meta for s in got[:-1])


def test_not_a_tar_is_damaged_not_raised(tmp_path):
    (tmp_path / "x.tar").write_bytes(b"garbage" * 100)
    report = ReadReport("x")
    assert list(iter_shard(tmp_path / "x.tar", report)) == [] and report.damaged


def test_invalid_json_member_recorded(tmp_path):
    raw_tar(tmp_path / "x.tar", [("0.jpg", b"a"), ("0.json", b"{oops")])
    report = ReadReport("x")
    (s,) = list(iter_shard(tmp_path / "x.tar", report))
    assert s.meta == {} and report.bad_members[0][0] == "0.json"


def test_invalid_utf8_caption_is_repaired_and_recorded(tmp_path):
    raw_tar(tmp_path / "x.tar", [("0.jpg", b"a"), ("0.txt", b"caf\xe9 au lait"), ("1.jpg", b"b"), ("1.txt", "café".encode())])
    report = ReadReport("x")
    a, b = list(iter_shard(tmp_path / "x.tar", report))
    assert a.caption == "caf\ufffd au lait" and b.caption == "café"
    assert report.bad_members == [("0.txt", "caption is not valid UTF-8 (byte 3); undecodable bytes read as U+FFFD")]


def test_oversized_member_refused_without_reading_it(tmp_path):
    raw_tar(tmp_path / "s.tar", [("k1.jpg", b"x" * 5000), ("k1.txt", b"cap"), ("k2.jpg", b"y" * 100), ("k2.txt", b"c2")])
    report = ReadReport("x")
    got = list(iter_shard(tmp_path / "s.tar", report, max_member_bytes=1000))
    assert [(s.key, s.image) for s in got] == [("k1", None), ("k2", b"y" * 100)]
    assert report.refused == [("k1.jpg", "5000 bytes, over the 1000-byte cap")]
    assert report.unread() == [("k1.jpg", "refused_member", "5000 bytes, over the 1000-byte cap")]


@pytest.mark.parametrize("mode,kind", [("w:gz", "gzip"), ("w:bz2", "bzip2"), ("w:xz", "xz")])
def test_compressed_tars_are_refused_whole(tmp_path, mode, kind):
    path = tmp_path / "s.tar"
    with tarfile.open(path, mode) as tar:  # a few KB that would inflate to a lot more
        info = tarfile.TarInfo("k.jpg")
        info.size = 10_000_000
        tar.addfile(info, io.BytesIO(b"\0" * info.size))
    report = ReadReport("x")
    assert list(iter_shard(path, report)) == [] and f"{kind}-compressed tar is not accepted" in report.damaged


def test_a_key_met_again_is_recorded_and_read_once(tmp_path):
    raw_tar(tmp_path / "s.tar", [("a.jpg", b"1"), ("a.txt", b"first"), ("b.jpg", b"2"), ("b.txt", b"b"),
                                 ("a.jpg", b"3"), ("a.txt", b"again")])
    report = ReadReport("x")
    got = list(iter_shard(tmp_path / "s.tar", report))
    assert [(s.key, s.caption) for s in got] == [("a", "first"), ("b", "b")]
    assert report.duplicates == ["a"] and report.unread()[0][:2] == ("a", "duplicate_key")


def test_read_samples_takes_only_the_wanted_keys(tmp_path):
    shard = tmp_path / "00000.tar"
    write_shard(shard, samples(6))
    got = read_samples(shard, {"00001", "00004", "nope"})
    assert sorted(got) == ["00001", "00004"]
    want = {s.key: s for s in iter_shard(shard)}
    assert all((g.image, g.caption, g.meta) == (want[k].image, want[k].caption, want[k].meta) for k, g in got.items())


def test_read_samples_survives_truncation_and_refuses_unsafe_members(tmp_path):
    shard = tmp_path / "00000.tar"
    write_shard(shard, samples(6))
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    assert sorted(read_samples(shard, {"00000", "00005"})) == ["00000"]
    raw_tar(tmp_path / "bad.tar", [("../00000.jpg", b"x"), ("/abs/00001.jpg", b"y")])
    assert read_samples(tmp_path / "bad.tar", {"../00000", "/abs/00001", "00000"}) == {}


def test_a_step_folder_lists_the_shards_its_records_name(tmp_path):
    """Readers trust records, never listings: a tar no record names (an abandoned attempt, an
    upload still in flight) is not read."""
    from core import atomic

    for name in ("00000.tar", "00001.tar", "00002.tar"):
        write_shard(tmp_path / name, [Sample("k", b"x", "jpg", "c", {})])
    assert [p.name for p in list_shards(tmp_path)] == ["00000.tar", "00001.tar", "00002.tar"]  # a plain folder
    (tmp_path / "_config.yaml").write_text("step: download\n")
    atomic.write_json(tmp_path / "_done" / "00001.json", {"files": ["00001.tar", "00001.parquet"]})
    assert [p.name for p in list_shards(tmp_path)] == ["00001.tar"]  # unfinished: what the markers name
    atomic.write_json(tmp_path / "_stats.json", {"parts": ["00000.tar", "00001.tar"]})
    assert [p.name for p in list_shards(tmp_path)] == ["00000.tar", "00001.tar"]  # finished: its record


def test_a_repeated_member_starts_another_copy_of_its_key(tmp_path):
    """`a.png a.txt a.png a.txt`, or two images under one key: the second copy is recorded as a
    duplicate key, not written over the first (a picture used to vanish without a trace)."""
    raw_tar(tmp_path / "s.tar", [("a.png", b"red"), ("a.txt", b"red"), ("a.png", b"blue"), ("a.txt", b"blue"),
                                 ("b.png", b"green"), ("b.png", b"black"), ("b.txt", b"b"),
                                 ("c.jpg", b"j"), ("c.png", b"p"), ("d.jpg", b"d")])
    report = ReadReport("x")
    got = list(iter_shard(tmp_path / "s.tar", report))
    assert [(s.key, s.image, s.caption) for s in got] == [("a", b"red", "red"), ("b", b"green", None),
                                                         ("c", b"j", None), ("d", b"d", None)]
    assert report.duplicates == ["a", "b", "c"] and report.samples == 7
    assert [u[:2] for u in report.unread()] == [("a", "duplicate_key"), ("b", "duplicate_key"), ("c", "duplicate_key")]
    wanted = read_samples(tmp_path / "s.tar", {"a", "b", "c"})  # the same first copies
    assert {k: (s.image, s.caption) for k, s in wanted.items()} == {"a": (b"red", "red"), "b": (b"green", None),
                                                                    "c": (b"j", None)}


def test_a_json_member_that_is_not_an_object_is_recorded_and_ignored(tmp_path):
    raw_tar(tmp_path / "x.tar", [("0.jpg", b"a"), ("0.json", b"[1, 2, 3]")])
    report = ReadReport("x")
    (s,) = list(iter_shard(tmp_path / "x.tar", report))
    assert s.image == b"a" and s.meta == {} and report.bad_members == [("0.json", "json is a list, not an object")]
