"""core.codeshard: write/read round trip, zero-copy memory map, manifest checks and refusals."""
from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest

from core import codeshard as CS


def columns(n: int, prefix: str = "k") -> dict:
    return {"key": [f"{prefix}{i}" for i in range(n)], "caption": [f"c{i}" for i in range(n)],
            "orig_w": [100] * n, "orig_h": [80] * n, "crop_top": [0] * n, "crop_left": [10] * n}


def tok(sha: str = "a" * 64) -> CS.TokenizerInfo:
    return CS.TokenizerInfo(sha256=sha, path="/vq", codebook_size=8192, downsample=16)


@pytest.fixture
def folder(tmp_path):
    rng = np.random.default_rng(0)
    codes = [rng.integers(0, 8192, (n, 4, 4)) for n in (3, 5)]
    infos = [CS.write_shard(tmp_path / f"{i:05d}.arrow", CS.make_table(c, columns(len(c), f"s{i}_")))
             for i, c in enumerate(codes)]
    CS.write_manifest(tmp_path, CS.Manifest(resolution=64, grid=(4, 4), tokenizer=tok(), shards=infos))
    return tmp_path, np.concatenate([c.reshape(len(c), -1) for c in codes])


def test_round_trip_and_global_indexing(folder):
    path, codes = folder
    ds = CS.CodeDataset(path, tokenizer_sha256="a" * 64, verify_checksums=True)
    assert len(ds) == 8 and ds.manifest.num_rows == 8 and ds.manifest.codebook_size == 8192
    assert np.array_equal(ds.codes(np.arange(8)), codes)
    assert np.array_equal(ds.codes(np.array([7, 0, 4])), codes[[7, 0, 4]])
    assert ds.locate(3) == (1, 0) and ds.locate(2) == (0, 2)
    row = ds.row(4)
    assert row["key"] == "s1_1" and row["long_caption"] is None and row["aesthetic"] is None
    assert row["codes"].dtype == np.uint16
    with pytest.raises(IndexError):
        ds.locate(8)


def test_codes_are_a_zero_copy_view_of_the_map(folder):
    path, _ = folder
    shard = CS.CodeShard(path / "00000.arrow")
    assert shard.codes.dtype == np.uint16 and shard.codes.shape == (3, 16)
    assert not shard.codes.flags.owndata  # a view of the memory map, not a copy
    buf = shard.table.column("codes").chunk(0).values.buffers()[1]
    assert shard.codes.ctypes.data == buf.address


def test_refuses_other_tokenizer_and_format_version(folder):
    path, _ = folder
    with pytest.raises(CS.CodeShardError, match="expected bbbbbbbbbbbb"):
        CS.CodeDataset(path, tokenizer_sha256="b" * 64)
    m = json.loads((path / CS.MANIFEST).read_text())
    m["format_version"] = 99
    (path / CS.MANIFEST).write_text(json.dumps(m))
    with pytest.raises(CS.CodeShardError, match="format version 99"):
        CS.CodeDataset(path)


def test_refuses_shard_with_other_format_version(tmp_path):
    table = CS.make_table(np.zeros((2, 4), np.int64), columns(2))
    table = table.replace_schema_metadata({b"tessera.format_version": b"0"})
    with pa.OSFile(str(tmp_path / "x.arrow"), "wb") as sink, pa.ipc.new_file(sink, table.schema) as w:
        w.write_table(table)
    with pytest.raises(CS.CodeShardError, match="format version 0, expected 1"):
        CS.CodeShard(tmp_path / "x.arrow")


def test_refuses_checksum_rows_and_missing(folder):
    path, _ = folder
    data = bytearray((path / "00001.arrow").read_bytes())
    data[-200] ^= 0xFF
    (path / "00001.arrow").write_bytes(bytes(data))
    with pytest.raises(CS.CodeShardError, match="checksum differs"):
        CS.CodeDataset(path, verify_checksums=True)
    (path / "00001.arrow").unlink()
    with pytest.raises(CS.CodeShardError, match="listed in the manifest but missing"):
        CS.CodeDataset(path)
    with pytest.raises(CS.CodeShardError, match="no manifest.json"):
        CS.CodeDataset(path / "nowhere")


def test_codes_out_of_uint16_range_and_required_columns():
    with pytest.raises(CS.CodeShardError, match="uint16"):
        CS.make_table(np.full((1, 4), 70000), columns(1))
    cols = columns(1)
    del cols["caption"]
    with pytest.raises(CS.CodeShardError, match="'caption' is required"):
        CS.make_table(np.zeros((1, 4)), cols)


def test_manifest_json_round_trip():
    m = CS.Manifest(resolution=256, grid=(16, 16), tokenizer=tok(), shards=[CS.ShardInfo("a.arrow", 2, 10, "x")])
    back = CS.Manifest.from_json(json.loads(json.dumps(m.to_json())))
    assert back == m and m.to_json()["num_rows"] == 2


def test_a_cut_shard_and_codes_outside_the_codebook_are_named(folder):
    """Without --set data.verify_checksums=true: a shard of another size is refused at open
    (Arrow said only "Not an Arrow file"), a code >= the codebook size when its batch is read
    (the model raised an IndexError)."""
    path, _ = folder
    table = CS.CodeShard(path / "00000.arrow").table
    codes = np.array(table.column("codes").to_pylist(), dtype=np.uint16)
    codes[1, 5] = 9000  # the manifest's codebook has 8192 entries
    rewritten = CS.make_table(codes.reshape(len(codes), 4, 4), {n: table.column(n).to_pylist()
                                                                  for n in table.column_names if n != "codes"})
    info = CS.write_shard(path / "00000.arrow", rewritten)
    manifest = CS.read_manifest(path)
    manifest.shards[0] = info
    CS.write_manifest(path, manifest)
    ds = CS.CodeDataset(path)
    assert ds.codes(np.array([0, 3])).shape == (2, 16)
    with pytest.raises(CS.CodeShardError, match=r"00000.arrow: row 1 holds code 9000, outside the 8192-entry"):
        ds.codes(np.array([4, 1]))
    data = (path / "00001.arrow").read_bytes()
    (path / "00001.arrow").write_bytes(data[: len(data) // 2])
    with pytest.raises(CS.CodeShardError, match=rf"00001.arrow: {len(data) // 2} bytes, the manifest says {len(data)}"):
        CS.CodeDataset(path)
