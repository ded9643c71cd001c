"""How much of pretokenize's data path the per-shard worker hides behind the encoder, on any CPU.

    .venv/bin/python bench/pretokenize_overlap.py                    # 400 ms per batch of 64, 2 threads
    .venv/bin/python bench/pretokenize_overlap.py --ms 150 --threads 8

A GPU encoder is a queue the host waits on with the GIL free. Here the encoder is replaced by
exactly that: `time.sleep(ms)` per batch, returning codes of the right shape. Everything else is
the real unit (`pretokenize.encode.encode_shard`: tar reading, the decode/resize thread pool,
batch assembly, code-shard and ledger writes, markers) on real JPEG shards. The baseline, in the
same run, is the encoder alone: batches x ms. ratio = encoder alone / end to end; 1.0 means the
data path is fully hidden. Two parts of the main thread's time are shown: waiting on futures
(decoded images, and finished batches from the encoder thread) and the uint8 -> float
tensor conversion. Each shard starts its pipeline empty (its first batch is decoded before the
encoder has work), so small shards (`--per-shard`) cost more than img2dataset's 10,000.
Pick `--ms` above the decode pool's time per batch (images x decode ms / threads), or the
decode pool, not the overlap, is what is measured.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import importlib.util
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import core.vq  # noqa: E402
from core.rundir import RunDir  # noqa: E402
from pretokenize import encode, preprocess  # noqa: E402


def sibling(name: str):
    """bench/<name>.py as a module (shard writer), without shadowing the package of that name."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", Path(__file__).with_name(f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


class Timers:
    """Wraps the main thread's calls worth attributing; seconds accumulate per name."""

    def __init__(self) -> None:
        self.s: dict[str, float] = {"future_waits": 0.0, "to_tensor": 0.0}

    def wrap(self, name: str, fn):
        def timed(*a, **k):
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                self.s[name] += time.perf_counter() - t
        return timed


def one_pass(shards: Path, out: Path, settings: encode.EncodeSettings) -> float:
    shutil.rmtree(out, ignore_errors=True)
    rd = RunDir.open(out, "pretokenize", {"bench": "overlap"})
    vq = torch.nn.Linear(1, 1)  # only its device is read: the encoder is the sleep below
    t = time.perf_counter()
    for tar in sorted(shards.glob("*.tar")):
        encode.encode_shard(vq, tar, rd.path, settings)
    return time.perf_counter() - t


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ms", type=float, default=400.0, help="simulated encoder time per batch (ms)")
    ap.add_argument("--threads", type=int, default=2, help="decode threads (as an actor with that many CPUs)")
    ap.add_argument("--images", type=int, default=1024)
    ap.add_argument("--per-shard", type=int, default=256)
    ap.add_argument("--res", type=int, default=256)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--prefetch", type=int, default=2, help="batches decoded ahead (PretokenizeConfig.prefetch_batches)")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    grid = args.res // 16

    def fake_encode(vq, pixels, autocast_dtype=None):
        time.sleep(args.ms / 1000)  # the host waiting on a GPU, GIL released
        return torch.zeros(pixels.shape[0], grid, grid, dtype=torch.long)

    core.vq.encode_codes = fake_encode  # encode_shard imports it from core.vq at call time
    timers = Timers()
    cf.Future.result = timers.wrap("future_waits", cf.Future.result)
    preprocess.to_unit_tensor = timers.wrap("to_tensor", preprocess.to_unit_tensor)

    settings = encode.EncodeSettings(args.res, "center", 0, args.batch, args.threads, args.prefetch)
    with tempfile.TemporaryDirectory(prefix="bench_overlap_") as tmp:
        shards = Path(tmp) / "shards"
        shards.mkdir()
        sibling("pretokenize").write_shards(shards, args.images, args.res, per_shard=args.per_shard)
        batches = sum(-(-min(args.per_shard, args.images - s) // args.batch) for s in range(0, args.images, args.per_shard))
        encoder_alone = batches * args.ms / 1000
        walls, parts = [], []
        for _ in range(args.repeats):
            timers.s = dict.fromkeys(timers.s, 0.0)
            walls.append(one_pass(shards, Path(tmp) / "out", settings))
            parts.append(dict(timers.s))
    wall = statistics.median(walls)
    median_parts = {k: statistics.median(p[k] for p in parts) for k in parts[0]}
    print(f"{args.images} images, {args.res} px, batch {args.batch}, {args.threads} decode threads, "
          f"prefetch {args.prefetch}, simulated encoder {args.ms:.0f} ms/batch; medians of {args.repeats}")
    print(f"encoder alone {encoder_alone:.2f} s | end to end {wall:.2f} s (runs: "
          + ", ".join(f"{w:.2f}" for w in walls) + f") | ratio {encoder_alone / wall:.3f}")
    print("main thread: " + ", ".join(f"{k} {v:.2f} s" for k, v in median_parts.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
