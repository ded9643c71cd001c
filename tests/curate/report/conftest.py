"""One small run of the whole chain for the report tests, made by the real steps where they run
offline in seconds: metadata (synth -> `curate run`: dedup + filter + captions), neardup and
score (Open-NSFW) over image shards, pretokenize + check with a tiny VQ, and a few training
steps of the debug model. The download folder is written with the real writers (shards by
core.imageshard, the img2dataset per-shard parquet, ledger records by curate.download.ledger,
the run record by core.rundir/core.ledger) instead of running img2dataset (8 s of start-up).
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from core import ledger, rundir
from core.imageshard import Sample, write_shard

THRESHOLDS = {"aesthetic": 4.5, "watermark": 0.5, "punsafe": 0.5}

# (photo or "placeholder", host, aesthetic, pwatermark, similarity) per sample of each shard;
# aesthetic and pwatermark straddle the thresholds so both sides of each have images.
SHARDS = {
    "00000": [("astronaut", "a.com", 4.40, 0.20, 0.31), ("coffee", "b.com", 4.60, 0.45, 0.28),
              ("chelsea", "c.com", 5.00, 0.55, 0.35), ("rocket", "d.com", 4.30, 0.10, 0.30),
              ("camera", "e.com", 6.00, 0.62, 0.33), ("coffee-small", "f.com", 4.55, 0.30, 0.29),
              ("chelsea", "g.com", 4.70, 0.48, 0.32)],
    "00001": [("horse", "h.com", 4.80, 0.05, 0.27), ("moon", "i.com", 3.90, 0.52, 0.26),
              ("brick", "j.com", 5.50, 0.40, 0.34), ("retina", "k.com", 4.52, 0.70, 0.30),
              ("placeholder", "p1.com", 5.10, 0.10, 0.20), ("placeholder", "p2.com", 5.20, 0.10, 0.20),
              ("placeholder", "p3.com", 5.30, 0.10, 0.20)],
}
FAILED = [("failed_to_download", "HTTP Error 404: File not found"), ("failed_to_resize", "Image decoding error: Truncated File Read")]


def _image_bytes(name: str) -> bytes:
    from image_shards_fixture import jpeg, photo, placeholder_png

    if name == "placeholder":
        return placeholder_png()
    if name == "coffee-small":  # a re-encoded, resized copy: a pHash near-duplicate of coffee
        return jpeg(photo("coffee"), quality=60, size=(300, 200))
    return jpeg(photo(name), size=(128, 128))


def write_download(folder: Path) -> Path:
    """A finished `curate download` folder: 2 shards of images plus 2 failed URLs."""
    from curate.download.ledger import record
    from curate.download.step import DownloadConfig

    folder.mkdir(parents=True)
    rd = rundir.RunDir.open(folder, "download", rundir.identity(DownloadConfig(image_size=128), {"path": "fixture"}))
    row = 0
    for shard, items in SHARDS.items():
        failed = FAILED if shard == "00001" else []
        samples, rows, records = [], [], []
        for i, item in enumerate(items + failed):
            key, ok = f"{shard}{i:04d}", i < len(items)
            name, host, aes, wm, sim = item if ok else ("dead", "dead.org", None, None, None)
            data = _image_bytes(name) if ok else b""
            meta = {"url": f"http://{host}/{key}.jpg", "key": key, "aesthetic": aes, "pwatermark": wm,
                    "similarity": sim, "punsafe": 0.01, "original_width": 128, "original_height": 128,
                    "sha256": hashlib.sha256(data).hexdigest() if ok else None}
            status, message = ("success", None) if ok else item
            if ok:
                samples.append(Sample(key, data, "png" if name == "placeholder" else "jpg", f"a photo of {name}",
                                      {**meta, "status": status}))
            rows.append({**meta, "status": status, "error_message": message, "caption": f"a photo of {name}",
                         "source_file": "part-00000.parquet", "source_row": row, "source_shard": int(shard)})
            records.append(record(row, key, status, message))
            row += 1
        write_shard(folder / f"{shard}.tar", samples)
        pq.write_table(pa.Table.from_pylist(rows), folder / f"{shard}.parquet")
        ledger.write(folder, shard, ledger.rows("download", "part-00000.parquet", records))
        rd.mark_done(shard, {"samples": len(samples)})
    counts = ledger.counts(folder)
    ledger.write_stats(folder, "download", row, counts, failed_reasons={"http_404": 1, "decode_error": 1},
                       shards=2, retry_shards=0)
    rundir.release_lock(folder)
    return folder


def run_metadata(root: Path) -> Path:
    """`curate run` of dedup -> filter -> captions over 3,000 synthetic LAION rows."""
    from curate import pipeline
    from curate.metadata import synth

    synth.run(synth.SynthConfig(rows=3000, files=2, seed=0), root / "laion", root / "captions.parquet")
    doc = {"curate": {"filter": THRESHOLDS},
           "pipelines": {"t": {"input": str(root / "laion"), "output": str(root / "meta"),
                               "steps": ["dedup", "filter", {"step": "captions", "captions": str(root / "captions.parquet")}]}}}
    pipeline.run(doc, "t")
    return root / "meta"


def run_images(root: Path) -> dict[str, Path]:
    """download (written) -> neardup -> score (Open-NSFW, in-process)."""
    from curate.images import neardup, score

    download = write_download(root / "web" / "download")
    neardup.run(neardup.NearDupConfig(distance=4, placeholder_hosts=3), str(download), str(root / "web" / "neardup"))
    score.run(score.ScoreConfig(nsfw=True, executor="local", keep_list=str(root / "web" / "neardup" / "keep.parquet")),
              str(download), str(root / "web" / "score"))
    return {"download": download, "neardup": root / "web" / "neardup", "score": root / "web" / "score"}


def run_codes(root: Path, download: Path, keep: Path) -> Path:
    """pretokenize (tiny random VQ, 32 px, in-process) and `pretokenize check`."""
    from core import vq as V
    from pretokenize.check import CheckConfig, run_check
    from pretokenize.run import PretokenizeConfig, run

    vq_dir = root / "vq"
    V.save_vq(V.build_vq(V.tiny_vq_config(codebook=64, downsample=4, width=8), seed=0), vq_dir)
    codes = root / "codes"
    run(PretokenizeConfig(res=32, vq=str(vq_dir), executor="local", keep_list=str(keep), batch_size=8), str(download), str(codes))
    run_check(CheckConfig(n=4, usage_rows=100), codes)
    return codes


def run_train(root: Path, codes: Path) -> Path:
    """4 steps of the debug model with a sample grid every 2 steps."""
    from core.config import REPO_PIPELINES, parse_sets
    from train.stages import load_stage
    from train.trainer import run

    sets = parse_sets([f"data.path={codes}", "steps=4", "log_every=1", "ckpt_every=4", "sample.every=2",
                       "sample.steps=2", "batch_size=4", "threads=1", "tensorboard=false"])
    run(load_stage("debug", REPO_PIPELINES, sets), "debug", root / "train")
    return root / "train"


@pytest.fixture(scope="session")
def chain(tmp_path_factory, ray_local) -> dict[str, Path]:
    """Every folder of one small run under one root (see the module docstring)."""
    import torch

    root = tmp_path_factory.mktemp("chain")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        meta = run_metadata(root)
        images = run_images(root)
        codes = run_codes(root, images["download"], images["neardup"] / "keep.parquet")
        train = run_train(root, codes)
    finally:
        torch.set_num_threads(threads)
    return {"root": root, "meta": meta, **images, "codes": codes, "train": train}

