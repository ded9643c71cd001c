"""Trainer benchmarks, each against a baseline measured in the same run (medians of repeats).

1. Loader: `CodeLoader.next_batch()` (memory-mapped code shards -> codes + captions +
   micro-conditions) in samples/s, against a raw memory copy of the same bytes (the batch's
   code rows copied out of one contiguous in-RAM array), and against the codes-only gather.
2. Step: the trainer's full `train_step` (masking, CFG dropout, loss, backward, clipping,
   AdamW, LR schedule) against a bare forward/backward/AdamW step of the same model on the
   same (pre-masked) batch. Goal: bare / full >= 0.95 with the debug model on CPU.

    .venv/bin/python bench/train.py [--small]
"""
from __future__ import annotations

import argparse
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from core.codeshard import CodeDataset, Manifest, TokenizerInfo, make_table, write_manifest, write_shard  # noqa: E402
from core.config import REPO_PIPELINES  # noqa: E402
from train import distributed  # noqa: E402
from train.data import CodeLoader  # noqa: E402
from train.masking import cond_value, mask_ratio, mask_tokens, sample_t  # noqa: E402
from train.stages import load_stage  # noqa: E402
from train.trainer import Trainer  # noqa: E402


def write_codes(folder: Path, rows: int, shards: int, grid: tuple[int, int], codebook: int) -> Path:
    """A code folder shaped like stage-1 data (16x16 codes = 512 B per sample) with captions."""
    rng = np.random.default_rng(0)
    infos, per = [], rows // shards
    for s in range(shards):
        ids = range(s * per, (s + 1) * per)
        table = make_table(rng.integers(0, codebook, (per, grid[0] * grid[1])), {
            "key": [f"{i:09d}" for i in ids],
            "caption": [f"a photograph of object number {i} on a table, natural light" for i in ids],
            "long_caption": [f"a long and detailed description of photograph {i} " * 4 for i in ids],
            "orig_w": [512] * per, "orig_h": [384] * per, "crop_top": [0] * per, "crop_left": [64] * per,
            "aesthetic": [5.5] * per,
        })
        infos.append(write_shard(folder / f"{s:05d}.arrow", table))
    tok = TokenizerInfo(sha256="0" * 64, path="none", codebook_size=codebook, downsample=16)
    write_manifest(folder, Manifest(resolution=grid[0] * 16, grid=grid, tokenizer=tok, shards=infos))
    return folder


def median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_loader(folder: Path, batch: int, repeats: int) -> dict[str, float]:
    ds = CodeDataset(folder)
    loader = CodeLoader(ds, batch, seed=0, long_caption_prob=0.2)
    ram = np.concatenate([s.codes for s in ds.shards])  # (N, L) uint16, in RAM
    out = np.empty((batch, ram.shape[1]), np.uint16)
    idx_loader = CodeLoader(ds, batch, seed=0)

    def memcpy():  # the same number of bytes, one contiguous copy
        start = np.random.randint(0, len(ram) - batch)
        np.copyto(out, ram[start : start + batch])

    def gather():  # codes only, random rows from the memory map
        ds.codes(idx_loader.next_indices()[0])

    loader_t = median_time(loader.next_batch, repeats)
    memcpy_t = median_time(memcpy, repeats)
    gather_t = median_time(gather, repeats)
    return {"loader": batch / loader_t, "codes_gather": batch / gather_t, "memcpy": batch / memcpy_t}


def bench_step(folder: Path, run_dir: Path, repeats: int, threads: int | None) -> dict[str, float]:
    sets = {"data": {"path": str(folder)}, "tensorboard": False, "sample": {"every": 0}, "threads": threads,
            "batch_size": 16, "steps": 10**6}
    trainer = Trainer(load_stage("debug", REPO_PIPELINES, sets), "debug", run_dir, distributed.init())
    inputs = [trainer.prepare(trainer.loader.next_batch())]
    inp, model, opt = inputs[0], trainer.raw, trainer.optimizer
    gen = torch.Generator().manual_seed(0)
    masked, mask = mask_tokens(inp.codes, sample_t(len(inp.codes), gen), trainer.model_cfg.mask_token_id, gen)
    timestep = cond_value(mask_ratio(mask))
    step = [0]

    def full():
        trainer.train_step(inputs, step[0])["loss"].item()
        step[0] += 1

    def bare():
        logits = model(masked, inp.hidden, inp.pooled, inp.micro_conds, timestep)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1])[mask.reshape(-1)], inp.codes[mask])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss.item()

    for _ in range(5):  # warm-up
        full(), bare()
    full_t, bare_t = [], []
    for _ in range(repeats):  # interleaved, so machine noise hits both alike
        full_t.append(median_time(full, 1))
        bare_t.append(median_time(bare, 1))
    return {"full_ms": 1e3 * statistics.median(full_t), "bare_ms": 1e3 * statistics.median(bare_t),
            "tokens": inp.codes[0].numel() * len(inp.codes)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--small", action="store_true", help="fewer rows and repeats (a quick check)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args()
    rows, repeats = (20_000, 30) if args.small else (200_000, 100)
    with tempfile.TemporaryDirectory() as tmp:
        folder = write_codes(Path(tmp) / "codes", rows, 4, (16, 16), 8192)
        loader = bench_loader(folder, 256, repeats)
        print(f"loader, batch 256 of 16x16 codes ({rows} rows, 4 shards, memory-mapped):")
        for name, sps in loader.items():
            print(f"  {name:13s} {sps:14,.0f} samples/s")
        print(f"  ratio loader / memcpy      {loader['loader'] / loader['memcpy']:.4f}")
        print(f"  ratio loader / codes gather {loader['loader'] / loader['codes_gather']:.4f}")
        small = Path(tmp) / "small"
        small.mkdir()
        write_codes(small, 512, 1, (8, 8), 64)
        step = bench_step(small, Path(tmp) / "run", repeats // 2, args.threads)
        print(f"train step, debug model, batch 16 x 8x8 codes, threads {torch.get_num_threads()}:")
        print(f"  full train_step {step['full_ms']:.2f} ms   bare fwd/bwd/AdamW {step['bare_ms']:.2f} ms")
        print(f"  ratio bare / full {step['bare_ms'] / step['full_ms']:.3f} (goal >= 0.95)")
        print(f"  full step {step['tokens'] / step['full_ms'] * 1e3:,.0f} tokens/s")
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")


if __name__ == "__main__":
    main()
