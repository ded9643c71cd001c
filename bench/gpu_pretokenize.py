"""GPU benchmark: pretokenize images/s at 256 and 512 px with the real 146M-parameter VQ.

    .venv/bin/python bench/gpu_pretokenize.py          # one GPU, one call, < 8 minutes
    .venv/bin/python bench/gpu_pretokenize.py --tiny   # CPU check of the script (tiny VQ)

Random weights in the released aMUSEd/Meissonic VQ config (shared/reference/vq_config.json:
f16, 8192 codes, 146,244,675 parameters; speed does not depend on the weights' values). Per
resolution it reports, fp32 with TF32 off (what `pretokenize` runs):
  * encoder alone: `encode_codes` on preloaded GPU tensors, images/s (largest batch that fits);
  * end-to-end: `pretokenize.run` on JPEG shards written here (in-process executor = the
    per-shard worker a GPU actor runs, decode threads = the machine's cores), images/s from the
    workers' own per-shard timings (tokenizer load excluded) and from wall time.
Prints the device name first and one JSON line per resolution.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from core.vq import build_vq, encode_codes, load_vq, save_vq, tiny_vq_config  # noqa: E402
from pretokenize.run import PretokenizeConfig, run  # noqa: E402

PLAN = {256: {"batch": 64, "images": 2048}, 512: {"batch": 32, "images": 1024}}
TINY_PLAN = {64: {"batch": 8, "images": 16}, 128: {"batch": 4, "images": 8}}


def sibling(name: str):
    """bench/pretokenize.py (shards writer, real config) as a module, without shadowing the package."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", Path(__file__).with_name(f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def encoder_images_per_s(vq, res: int, batch: int, device: str, seconds: float) -> tuple[float, int]:
    """Images/s of the encoder alone on a preloaded (batch, 3, res, res) tensor; halves the batch on OOM."""
    while True:
        try:
            x = torch.rand(batch, 3, res, res, device=device)
            for _ in range(2):
                encode_codes(vq, x)  # warm-up (cuDNN autotune, allocator)
            sync(device)
            n, t = 0, time.perf_counter()
            while time.perf_counter() - t < seconds or n < 3:
                encode_codes(vq, x)
                n += 1
            sync(device)
            return n * batch / (time.perf_counter() - t), batch
        except torch.OutOfMemoryError:
            if batch == 1:
                raise
            batch //= 2
            torch.cuda.empty_cache()


def end_to_end(vq_dir: Path, work: Path, res: int, batch: int, images: int, helpers) -> dict:
    shards = work / f"shards{res}"
    helpers.write_shards(shards, images, res, per_shard=max(1, images // 4))
    cfg = PretokenizeConfig(res=res, vq=str(vq_dir), batch_size=batch, executor="local",
                            decode_threads=os.cpu_count() or 4)
    t = time.perf_counter()
    stats = run(cfg, shards, work / f"codes{res}")
    wall = time.perf_counter() - t
    return {"end_to_end_images_per_s": stats["kept"] / max(1e-9, stats["encode_seconds"]),
            "end_to_end_wall_images_per_s": stats["kept"] / wall, "end_to_end_images": stats["kept"]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="tiny VQ on CPU: checks the script")
    ap.add_argument("--device", default=None, help="default: cuda when available")
    ap.add_argument("--seconds", type=float, default=20.0, help="encoder-alone timing per resolution")
    args = ap.parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu" and not args.tiny:
        print("no GPU available: skipped (use --tiny to check the script on CPU)")
        return 0
    if device.startswith("cuda"):
        torch.backends.cudnn.allow_tf32 = False  # fp32 as pretokenize runs it
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.benchmark = True
    helpers = sibling("pretokenize")
    name = torch.cuda.get_device_name(0) if device.startswith("cuda") else "cpu"
    plan = TINY_PLAN if args.tiny else PLAN
    with tempfile.TemporaryDirectory(prefix="bench_gpu_pretokenize_") as tmp:
        work = Path(tmp)
        cfg = tiny_vq_config(codebook=1024, downsample=16) if args.tiny else helpers.real_vq_config()
        save_vq(build_vq(cfg), work / "vq")
        vq = load_vq(work / "vq", device=device)
        params = sum(p.numel() for p in vq.parameters())
        print(f"device: {name} | torch {torch.__version__} | VQ {params:,} parameters, fp32 (TF32 off)")
        for res, p in plan.items():
            ips, batch = encoder_images_per_s(vq, res, p["batch"], device, 0.5 if args.tiny else args.seconds)
            rec = {"device": name, "res": res, "grid": f"{res // 16}x{res // 16}", "batch": batch,
                   "encoder_images_per_s": ips, **end_to_end(work / "vq", work, res, batch, p["images"], helpers)}
            rec["ratio"] = rec["end_to_end_images_per_s"] / ips
            if device.startswith("cuda"):
                rec["peak_gpu_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
            print(f"{res} px: encoder alone {ips:.1f} img/s (batch {batch}) | end-to-end {rec['end_to_end_images_per_s']:.1f} "
                  f"img/s ({rec['end_to_end_wall_images_per_s']:.1f} by wall time incl. tokenizer load) | ratio {rec['ratio']:.2f}")
            print(json.dumps(rec))
    return 0


if __name__ == "__main__":
    sys.exit(main())
