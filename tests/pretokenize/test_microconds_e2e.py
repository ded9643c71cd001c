"""Micro-conditions survive the pipeline: non-square originals of several sizes, served on
loopback, downloaded with the default settings (aspect kept, never upscaled), pretokenized, and
their stored orig size and crop offsets checked exactly against the original images."""
from __future__ import annotations

import io
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "curate"))
import httpserver as hs  # noqa: E402

from core.codeshard import CodeDataset  # noqa: E402
from curate.download import step as dl  # noqa: E402
from pretokenize.geometry import center_offset, resized_size  # noqa: E402
from pretokenize.run import PretokenizeConfig, run  # noqa: E402

RES = 32  # the tiny test VQ is f4 -> 8x8 grids
SIZES = {"wide": (1024, 768), "small_wide": (300, 200), "tall": (1200, 1800), "square": (640, 640), "tiny": (40, 30)}


def photo(w: int, h: int) -> bytes:
    yy, xx = np.mgrid[0:h, 0:w]
    arr = np.stack([255 * xx / w, 255 * yy / h, 128 + 60 * np.sin(xx / 9.0)], -1).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=85)
    return buf.getvalue()


def test_download_then_pretokenize_keeps_the_originals_micro_conditions(tmp_path, vq_dir, ray_local):
    with hs.ImageServer() as server:
        urls = [server.add(f"{name}.jpg", hs.Route(photo(*size))) for name, size in SIZES.items()]
        (tmp_path / "meta").mkdir()
        pq.write_table(pa.table({"URL": urls, "TEXT": list(SIZES)}), tmp_path / "meta" / "part-00000.parquet")
        cfg = dl.DownloadConfig(image_size=64, processes=1, threads=4, samples_per_shard=16, allow_networks=["127.0.0.0/8"])
        stats = dl.run(cfg, str(tmp_path / "meta"), str(tmp_path / "images"))
    assert stats["kept"] == len(SIZES)
    out = tmp_path / "codes"
    codes = run(PretokenizeConfig(res=RES, vq=str(vq_dir), executor="local", cpus_per_actor=1), tmp_path / "images", out)
    assert (codes["kept"], codes["filtered"]) == (len(SIZES) - 1, 1)  # the 40x30 original: shorter side 30 < 32
    ledger = pq.read_table(out / "_ledger").to_pylist()
    small = [r for r in ledger if r["state"] == "filtered"]
    assert [r["reason"] for r in small] == ["too_small"] and "original 40x30" in small[0]["value"]
    ds = CodeDataset(out)
    rows = {ds.row(i)["caption"]: ds.row(i) for i in range(len(ds))}
    for name, (w, h) in SIZES.items():
        if name == "tiny":
            assert name not in rows
            continue
        r = rows[name]
        fw, fh = resized_size(w, h, RES)  # the original's frame at shorter side = RES
        assert (r["orig_w"], r["orig_h"]) == (w, h), name
        assert (r["crop_top"], r["crop_left"]) == (center_offset(fh, RES), center_offset(fw, RES)), name
