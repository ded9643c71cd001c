"""Benchmark: end-to-end `pretokenize` against the VQ encoder alone, same batch, same run.

    .venv/bin/python bench/pretokenize.py            # 256 px, 96 images, quarter-width real VQ
    .venv/bin/python bench/pretokenize.py --small    # quick check of the script (tiny VQ)

1. Writes JPEG image shards (synthetic photos, 1.5x the output side, captions of LAION length).
2. Baseline: every image decoded and resized up front, the (B, 3, res, res) tensors preloaded;
   time only `encode_codes` over them (the encoder alone).
3. End-to-end: `pretokenize.run` on the shards (in-process executor: the same per-shard worker
   the Ray actors run, with its decode/resize thread pool), image decode to code shards on disk.
   Goal: end-to-end / encoder-alone images/s >= 0.9 (the data path hides behind the encoder).
4. Bytes on disk per sample against raw uint16 codes (goal <= 1.2x): the codes column alone and
   the whole row (key, caption, micro-conditions, scores) separately.

VQ (`--tiny-vq` for a harsher test: a tiny f16 VQ whose encoder costs only several times the
image decode): the released tokenizer's architecture (5 DownEncoderBlock2D, f16, 8192 x 64-d codes, no mid
attention) at a quarter of its width by default (`--width-div 4`, block channels 32-64-64-128-192,
~1/16 of its FLOPs), so the encoder:decode cost ratio on 2 CPU cores resembles the full model on
a GPU fed by a few CPU cores. The script prints the measured per-image costs of both.
"""
from __future__ import annotations

import argparse
import io
import json
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import pyarrow as pa  # noqa: E402

from core import codeshard  # noqa: E402
from core.codeshard import CodeDataset  # noqa: E402
from core.imageshard import Sample, iter_shard, write_shard  # noqa: E402
from core.vq import build_vq, encode_codes, load_vq, save_vq, tiny_vq_config  # noqa: E402
from pretokenize.preprocess import prepare, to_unit_tensor  # noqa: E402
from pretokenize.run import PretokenizeConfig, run  # noqa: E402

REAL_CHANNELS = [128, 256, 256, 512, 768]  # shared/reference/vq_config.json


def real_vq_config(width_div: int = 1) -> dict:
    """The released aMUSEd/Meissonic VQ config, optionally with every width divided."""
    return {
        "_class_name": "VQModel", "act_fn": "silu", "block_out_channels": [c // width_div for c in REAL_CHANNELS],
        "down_block_types": ["DownEncoderBlock2D"] * 5, "up_block_types": ["UpDecoderBlock2D"] * 5,
        "in_channels": 3, "out_channels": 3, "latent_channels": 64, "layers_per_block": 2,
        "norm_num_groups": 32 // width_div if width_div > 1 else 32, "num_vq_embeddings": 8192, "vq_embed_dim": None,
        "mid_block_add_attention": False, "lookup_from_codebook": True, "force_upcast": True,
        "scaling_factor": 0.18215, "sample_size": 32, "norm_type": "group",
    }


def synthetic_photo(rng: np.random.Generator, w: int, h: int) -> np.ndarray:
    """Smooth gradients, shapes and sensor-like noise: JPEG-compresses like a photo."""
    yy, xx = np.mgrid[0:h, 0:w] / max(w, h)
    img = np.stack([xx, yy, 1 - xx * yy], -1) * rng.uniform(60, 220, 3)
    for _ in range(6):
        x0, y0 = rng.integers(0, w), rng.integers(0, h)
        img[y0: y0 + rng.integers(8, h // 2), x0: x0 + rng.integers(8, w // 2)] = rng.uniform(0, 255, 3)
    img += rng.normal(0, 6, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def write_shards(folder: Path, n: int, res: int, per_shard: int, seed: int = 0) -> None:
    from PIL import Image

    rng = np.random.default_rng(seed)
    for s in range(0, n, per_shard):
        samples = []
        for i in range(s, min(n, s + per_shard)):
            w, h = int(res * rng.uniform(1.3, 2.0)), int(res * rng.uniform(1.0, 1.5))
            buf = io.BytesIO()
            Image.fromarray(synthetic_photo(rng, w, h)).save(buf, "JPEG", quality=90)
            caption = "a photograph of a red house by the lake at sunset, wide angle"[: int(rng.integers(40, 64))]
            samples.append(Sample(f"{s // per_shard:05d}{i:04d}", buf.getvalue(), "jpg", caption,
                                  {"aesthetic": 5.5, "pwatermark": 0.1, "punsafe": 0.01, "original_width": w, "original_height": h}))
        write_shard(folder / f"{s // per_shard:05d}.tar", samples)


def time_preprocess(folder: Path, res: int) -> tuple[np.ndarray, float]:
    """Decode + resize + crop every image, single thread: (N, res, res, 3) and seconds per image."""
    images = [s.image for tar in sorted(folder.glob("*.tar")) for s in iter_shard(tar)]
    t = time.perf_counter()
    pixels = np.stack([prepare(b, res).pixels for b in images])
    return pixels, (time.perf_counter() - t) / len(images)


def time_encoder(vq, pixels: np.ndarray, batch: int) -> float:
    """Seconds to encode every preloaded batch (tensors built before the clock starts)."""
    batches = [to_unit_tensor(pixels[i: i + batch]) for i in range(0, len(pixels), batch)]
    t = time.perf_counter()
    for x in batches:
        encode_codes(vq, x)
    return time.perf_counter() - t


def time_end_to_end(cfg: PretokenizeConfig, shards: Path, work: Path, rep: int) -> tuple[float, Path]:
    out = work / f"codes{rep}"
    t = time.perf_counter()
    run(cfg, shards, out)
    return time.perf_counter() - t, out


def bytes_report(out: Path, grid: int) -> dict:
    """Bytes per sample on disk vs raw uint16 codes: the codes column and the whole row."""
    ds = CodeDataset(out)
    rows = len(ds)
    raw = rows * grid * 2
    files = sum(p.stat().st_size for p in out.glob("*.arrow"))
    codes_col = sum(s.table.column("codes").nbytes for s in ds.shards)
    # Split file bytes into per-row and per-file (schema, footer, padding) parts: write shard 0
    # once and twice over; real shards hold ~10k rows, so the per-row figure is what scales.
    table = ds.shards[0].table
    one, two = (codeshard.write_shard(out / "_sizes" / f"{k}.arrow", pa.concat_tables([table] * k).combine_chunks()).bytes
                for k in (1, 2))
    per_row = (two - one) / table.num_rows
    return {"rows": rows, "raw_code_bytes_per_sample": grid * 2, "file_bytes_per_sample": files / rows,
            "codes_column_ratio": codes_col / raw, "whole_file_ratio": files / raw,
            "row_bytes_per_sample": per_row, "whole_row_ratio": per_row / (grid * 2), "file_fixed_bytes": one - per_row * table.num_rows}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", action="store_true", help="tiny VQ, few images: checks the script runs")
    ap.add_argument("--res", type=int, default=256)
    ap.add_argument("--images", type=int, default=96)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--width-div", type=int, default=4, help="divide the real VQ's channel widths by this")
    ap.add_argument("--tiny-vq", action="store_true",
                    help="tiny f16 VQ (width 16, 8192 codes): decode/resize becomes a large share of the work")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2, help="torch threads (= the CPU actor's cores)")
    args = ap.parse_args(argv)
    if args.small:
        args.res, args.images, args.batch_size, args.repeats = 64, 24, 8, 2
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="bench_pretokenize_") as tmp:
        work = Path(tmp)
        cfg_dict = (tiny_vq_config(codebook=1024, downsample=8) if args.small else
                    tiny_vq_config(codebook=8192, downsample=16) if args.tiny_vq else real_vq_config(args.width_div))
        save_vq(build_vq(cfg_dict), work / "vq")
        write_shards(work / "shards", args.images, args.res, per_shard=max(1, args.images // 2))
        vq = load_vq(work / "vq")
        pixels, prep_s = time_preprocess(work / "shards", args.res)
        cfg = PretokenizeConfig(res=args.res, vq=str(work / "vq"), batch_size=args.batch_size, executor="local",
                                cpus_per_actor=args.threads)
        enc, e2e, out = [], [], None
        for rep in range(args.repeats):  # alternate so machine noise hits both alike
            enc.append(time_encoder(vq, pixels, args.batch_size))
            seconds, out = time_end_to_end(cfg, work / "shards", work, rep)
            e2e.append(seconds)
        enc_ips, e2e_ips = args.images / statistics.median(enc), args.images / statistics.median(e2e)
        grid = (args.res // (2 ** (len(cfg_dict["block_out_channels"]) - 1))) ** 2
        sizes = bytes_report(out, grid)  # type: ignore[arg-type]
    record = {
        "res": args.res, "images": args.images, "batch": args.batch_size, "threads": args.threads,
        "vq_channels": cfg_dict["block_out_channels"], "encoder_ms_per_image": 1000 * statistics.median(enc) / args.images,
        "decode_resize_ms_per_image": 1000 * prep_s, "encoder_images_per_s": enc_ips,
        "end_to_end_images_per_s": e2e_ips, "ratio": e2e_ips / enc_ips, **sizes,
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
    }
    print(f"VQ channels {record['vq_channels']} at {args.res} px, batch {args.batch_size}, {args.threads} threads, "
          f"{args.images} images, median of {args.repeats}")
    print(f"  decode+resize {record['decode_resize_ms_per_image']:.1f} ms/image (1 thread); "
          f"encoder {record['encoder_ms_per_image']:.1f} ms/image")
    print(f"  encoder alone {enc_ips:.2f} img/s | end-to-end pretokenize {e2e_ips:.2f} img/s | ratio {record['ratio']:.3f} (goal >= 0.9)")
    print(f"  bytes/sample {sizes['file_bytes_per_sample']:.1f} vs raw codes {sizes['raw_code_bytes_per_sample']}: "
          f"codes column {sizes['codes_column_ratio']:.3f}x, whole file {sizes['whole_file_ratio']:.3f}x "
          f"({args.images // 2} rows/shard); whole row without per-file overhead {sizes['whole_row_ratio']:.3f}x "
          f"({sizes['row_bytes_per_sample']:.1f} B; per file {sizes['file_fixed_bytes']:.0f} B) (goal <= 1.2x)")
    print(f"  peak RSS {record['peak_rss_gib']:.2f} GiB")
    print(json.dumps(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
