"""Training throughput and MFU of the Meissonic transformer on one GPU.

    .venv/bin/python bench/gpu_train.py                       # meissonic-1b at 256 and 512 px
    .venv/bin/python bench/gpu_train.py --compile             # blocks compiled, as the trainer does
    .venv/bin/python bench/gpu_train.py --compile --res 256 --batch-size 32 --accum 2 --text-tower
                                                              # the settings bench/gpu_stages.py trains with
    .venv/bin/python bench/gpu_train.py --small               # the script itself, on CPU (debug preset)

Each resolution: build the model, AdamW (fused on CUDA), then warm-up and timed optimizer steps of
`--accum` micro-batches, each a bf16-autocast forward + masked cross-entropy + backward, then the
optimizer step, on random codes, micro-conditions and text states (or, with --text-tower, the
frozen ViT-H-14 text tower with random weights encoding captions in bf16, as the trainer does).
Prints tokens/s, images/s, achieved TFLOP/s and MFU (model FLOPs from train/flops.py over the GPU's
spec peak), the attention kernel that ran (profiled), and, as the same-run baseline, the TFLOP/s of
a plain bf16 matmul on this device, so MFU can be read against what the chip delivers.
`--compile` is the trainer's `train.model.compile_blocks`; `--deterministic` the trainer's
`set_determinism` (its speed cost).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import resource
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from train.flops import GPU_PEAK_TFLOPS, flops_per_token  # noqa: E402
from train.kernels import attention_ops, sdpa_choice  # noqa: E402
from train.model import MODELS, ModelConfig, build_model, compile_blocks  # noqa: E402

CAPTION = "a photograph of a red fox standing in fresh snow at the edge of a pine forest, morning light"
DEFAULT_BATCH = {256: 64, 512: 16, 1024: 8}  # per-GPU batch that fits 80 GB without checkpointing


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="meissonic-1b", choices=sorted(MODELS), help="model preset")
    p.add_argument("--res", type=int, nargs="+", default=None,
                   help="image resolutions in px (f16 VQ: grid = res/16; 1024 adds the 2x2 compression)")
    p.add_argument("--batch-size", type=int, nargs="+", default=None,
                   help="micro-batch per resolution (one value for all, or one per --res; default: by resolution)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per resolution (default 10)")
    p.add_argument("--warmup", type=int, default=None,
                   help="untimed steps first: compilation, allocator (default 3)")
    p.add_argument("--compile", action="store_true", help="torch.compile the blocks (train.model.compile_blocks)")
    p.add_argument("--compile-backend", default="inductor", help="torch.compile backend (aot_eager: CPU tests)")
    p.add_argument("--accum", type=int, default=1, help="micro-batches per optimizer step (gradient accumulation)")
    p.add_argument("--text-tower", action="store_true",
                   help="encode captions with the frozen text tower every micro-batch (ViT-H-14, random weights)")
    p.add_argument("--deterministic", action="store_true", help="the trainer's deterministic mode")
    p.add_argument("--grad-ckpt", action="store_true", help="activation checkpointing of every block")
    p.add_argument("--device", default="auto", help="auto (cuda if present), cuda or cpu")
    p.add_argument("--small", action="store_true",
                   help="check the script quickly on CPU: debug preset, 256 px, batch 8, 3 steps")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="spec bf16 peak of the device, for MFU on devices not in train/flops.py")
    args = p.parse_args(argv)
    small = args.small  # --small picks the debug preset at 256 px; explicit options still win
    if small:
        args.preset = "debug"
    args.res = args.res or ([256] if small else [256, 512])
    args.batch_size = args.batch_size or ([8] if small else None)
    if args.batch_size and len(args.batch_size) not in (1, len(args.res)):
        p.error("--batch-size takes one value, or one per --res")
    args.steps = args.steps if args.steps is not None else (3 if small else 10)
    args.warmup = args.warmup if args.warmup is not None else (1 if small else 3)
    return args


def pick_device(args: argparse.Namespace) -> torch.device | None:
    """cuda when present; cpu only for the debug preset (a 1B model on CPU would take hours)."""
    if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()):
        return torch.device("cuda") if torch.cuda.is_available() else None
    if args.preset == "debug":
        return torch.device("cpu")
    return None


def device_peak(device: torch.device, override: float | None) -> tuple[str, float | None]:
    """Device name and its spec bf16 TFLOP/s (None when unknown)."""
    if device.type != "cuda":
        return "cpu", override
    name = torch.cuda.get_device_name(device)
    peak = next((v for k, v in GPU_PEAK_TFLOPS.items() if k in name.lower()), None)
    return name, override or peak


def random_batch(cfg: ModelConfig, b: int, grid: tuple[int, int], device: torch.device, gen: torch.Generator):
    """Random codes with ~half the positions masked, text states, pooled vectors, micro-conds, timesteps."""
    codes = torch.randint(0, cfg.codebook_size, (b, *grid), device=device, generator=gen)
    masked = torch.rand(codes.shape, device=device, generator=gen) < 0.5
    inputs = codes.masked_fill(masked, cfg.mask_token_id)
    text = torch.randn(b, 77, cfg.text_dim, device=device, generator=gen)
    pooled = torch.randn(b, cfg.pooled_dim, device=device, generator=gen)
    micro = torch.tensor([[256.0, 256.0, 0.0, 0.0, 6.0]], device=device).expand(b, -1)
    t = torch.rand(b, device=device, generator=gen)
    return (inputs, text, pooled, micro, t), codes, masked


def train_step(model, opt, batch, codes, masked, device: torch.device, accum: int = 1, text=None) -> None:
    """One optimizer step: `accum` micro-batches (each its own forward/backward), then AdamW."""
    for _ in range(accum):
        if text is not None:  # the trainer encodes each micro-batch's captions
            hidden, pooled = text.encode([CAPTION] * codes.shape[0])
            batch = (batch[0], hidden, pooled, *batch[3:])
        with torch.autocast(device.type, dtype=torch.bfloat16):
            logits = model(*batch)  # (B, h*w, K)
        loss = F.cross_entropy(logits[masked.flatten(1)].float(), codes[masked]) / accum  # masked positions only
        loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_tflops(device: torch.device, n: int, repeats: int = 10) -> float:
    """Baseline: TFLOP/s of an n x n bf16 matmul (fp32 on CPU) on this device."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    sync(device)
    return 2 * n**3 * repeats / (time.perf_counter() - start) / 1e12


def time_steps(args: argparse.Namespace, model, opt, cfg: ModelConfig, grid: tuple[int, int], b: int,
               device: torch.device, text=None) -> tuple[list[float], list[str]]:
    """Warm-up, timed steps at micro-batch b, then one profiled step. Returns the timed steps'
    seconds and the attention ops that ran."""
    gen = torch.Generator(device=device).manual_seed(0)
    batch, codes, masked = random_batch(cfg, b, grid, device, gen)
    step = lambda: train_step(model, opt, batch, codes, masked, device, args.accum, text)  # noqa: E731
    for _ in range(args.warmup):
        step()
    times = []
    for _ in range(args.steps):
        sync(device)
        start = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - start)
    return times, attention_ops(step, device)


def bench_resolution(args: argparse.Namespace, device: torch.device, res: int, peak: float | None) -> dict:
    base = MODELS[args.preset]
    cfg = dataclasses.replace(base, downsample=res >= 1024) if args.preset != "debug" else base
    grid = (res // 16, res // 16)
    if args.batch_size:
        b = args.batch_size[args.res.index(res) if len(args.batch_size) > 1 else 0]
    else:
        b = DEFAULT_BATCH.get(res, 8) if device.type == "cuda" else 8
    torch.manual_seed(0)
    model = build_model(cfg).to(device)
    model.gradient_checkpointing = args.grad_ckpt
    fused = {"fused": True} if device.type == "cuda" else {}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01, **fused)
    step_model = compile_blocks(model, args.compile_backend) if args.compile else model
    text = build_text(args, device)
    while True:  # halve the batch on out-of-memory rather than losing the whole run
        try:
            times, ops = time_steps(args, step_model, opt, cfg, grid, b, device, text)
            break
        except torch.cuda.OutOfMemoryError:
            opt.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()
            if b == 1:
                raise
            print(f"  out of memory at batch {b}; retrying with {b // 2}")
            b //= 2
    step = statistics.median(times)
    tokens_s = b * args.accum * grid[0] * grid[1] / step
    tflops = flops_per_token(cfg, grid) * tokens_s / 1e12
    mem = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else math.nan
    kernel = sdpa_choice(cfg, grid, b, device, torch.bfloat16)
    del model, opt, step_model, text
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    return {"res": res, "grid": f"{grid[0]}x{grid[1]}", "batch": b, "accum": args.accum, "step_s_median": step,
            "step_s_min": min(times), "tokens_per_s": tokens_s, "images_per_s": b * args.accum / step,
            "tflops": tflops, "mfu": tflops / peak if peak else None, "peak_mem_gib": mem,
            "sdpa_choice": kernel, "attention_ops": ops}


def build_text(args: argparse.Namespace, device: torch.device):
    """The trainer's frozen text tower in bf16 (--text-tower): ViT-H-14 with random weights, or the
    tiny one for the debug preset. None without --text-tower."""
    if not args.text_tower:
        return None
    from train.text_encoder import REAL_MODEL_NAME, TextEncoder

    text = TextEncoder.tiny() if args.preset == "debug" else TextEncoder.seeded(REAL_MODEL_NAME)
    return text.to(device).configure(0, torch.bfloat16)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = pick_device(args)
    if device is None:
        print("SKIPPED: no CUDA GPU visible. Run bench/gpu_train.py on a GPU machine, or test the "
              "script on CPU with --small.")
        return 0
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    if args.deterministic:
        from train.stages import StageConfig
        from train.trainer import set_determinism

        set_determinism(StageConfig(deterministic=True))
    name, peak = device_peak(device, args.peak_tflops)
    baseline = matmul_tflops(device, 8192 if device.type == "cuda" else 1024)
    print(f"device: {name} | preset {args.preset} | torch {torch.__version__} | compile {args.compile} | "
          f"grad-ckpt {args.grad_ckpt} | accum {args.accum} | text tower {args.text_tower} | "
          f"deterministic {args.deterministic} | spec peak {peak or 'unknown'} TFLOP/s | "
          f"matmul baseline {baseline:.3g} TFLOP/s")
    for res in args.res:
        r = bench_resolution(args, device, res, peak)
        mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "n/a"
        print(f"{res:>5} px  batch {r['batch']:>4} x {r['accum']}  step {r['step_s_median'] * 1e3:8.1f} ms  "
              f"{r['tokens_per_s']:>10,.0f} tok/s  {r['images_per_s']:8.1f} img/s  "
              f"{r['tflops']:7.3g} TFLOP/s  MFU {mfu}  ({r['tflops'] / baseline:.0%} of matmul)  "
              f"mem {r['peak_mem_gib']:.1f} GiB  attention {r['sdpa_choice']} {r['attention_ops']}")
        print(json.dumps({"device": name, "preset": args.preset, "compile": args.compile,
                          "text_tower": args.text_tower, "deterministic": args.deterministic,
                          "matmul_tflops": baseline, **r}))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"peak RSS {rss:.2f} GiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
