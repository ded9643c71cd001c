"""The real trainer on one GPU: `train run stage1`, `stage2`, `stage3` on generated code shards
(valid manifests at 256, 512, 1024 px), >= 200 optimizer steps each, against bench/gpu_train.py
at the same settings; the speed cost of `deterministic: true`; MFU at the stages' own
micro-batches; and OUT/measured.json for `train plan --measured`.

    python3 bench/gpu_stages.py --out /tmp/gpu_stages          # one H100/H200 call, ~9 minutes
    python bench/gpu_stages.py --small --out /tmp/stages        # the script itself on CPU (debug stage)

Each stage is the command a user runs (loader, text tower, compiled blocks, gradient accumulation,
checkpoint, sample grid), with `init_from` chaining stage1 -> stage2 -> stage3 (which adds the 2x2
layers). What differs from a real run, and why:
- the text tower is ViT-H-14 with random weights (`text.random`: no checkpoint on the machine); it
  costs what the real one costs;
- global batch = micro-batch x 2 (accumulation 2 on one GPU) instead of 2048/512/256, and
  micro-batches of 32/8/4 instead of 64/16/16, to fit the time: estimated compiled step times
  (H100: 256 px at 64 = 207 ms measured, 512 px and 1024 px scaled from the eager runs) give
  ~40 s of steps per stage, beside ~45 s of cold compilation, ~20 s of start-up and ~10 s to
  write the 12 GB checkpoint (weights + AdamW); three stages ~6 minutes;
- sample grids as false-colour code maps (no VQ weights on the machine), 8 MaskGIT steps.
bench/gpu_train.py then times the same model step at the same shapes (its compiled graphs come
from Inductor's cache, a few seconds), deterministic mode at 256 px, and the stages' own
micro-batches (64 at 256 px, 16 at 512 px) for MFU. Every step has a time estimate: one that no
longer fits `--budget` is skipped and reported as such, so the figures of the others survive.
Checkpoints go to `--work` (default: a temp folder), never to OUT: a device call brings back at
most 8 files, so OUT gets three: gpu_stages.log (every command's output), measured.json (every
figure, the metrics records included) and stage1's sample grid.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from train.metrics import read_records  # noqa: E402

SKIP_WINDOWS = 3  # log windows (10 steps each) left out of the steady state: compilation, warm-up
LOG = "gpu_stages.log"


@dataclass(frozen=True)
class StageRun:
    stage: str  # pipelines.yaml stage (the small check runs "debug" with these shapes)
    res: int  # pixels of the generated shards (grid = res / 16)
    micro: int  # micro-batch per forward
    accum: int  # micro-batches per optimizer step
    rows: int  # rows of generated shards (epochs repeat)
    estimate_s: float  # expected wall time of the command, for the budget


GPU_PLAN = (StageRun("stage1", 256, 32, 2, 4096, 150), StageRun("stage2", 512, 8, 2, 2048, 150),
            StageRun("stage3", 1024, 4, 2, 1024, 150))
# CPU check: the debug model on 4x4, 8x8, 16x16 grids, the third with the 2x2 layers like stage3.
SMALL_PLAN = (StageRun("stage1", 64, 4, 2, 64, 60), StageRun("stage2", 128, 2, 2, 32, 60),
              StageRun("stage3", 256, 2, 2, 32, 60))
MFU_BATCHES = {256: 64, 512: 16}  # the stages' own micro-batches (pipelines.yaml)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="logs, metrics, sample grids, measured.json")
    p.add_argument("--work", type=Path, default=None, help="run folders with checkpoints (default: a temp folder)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per stage (default 200; small: 20)")
    p.add_argument("--budget", type=float, default=510.0, help="seconds for everything; steps that no longer fit are skipped")
    p.add_argument("--small", action="store_true", help="check the script on CPU: debug stage, tiny shards")
    args = p.parse_args(argv)
    args.steps = args.steps or (20 if args.small else 200)
    return args


def write_shards(folder: Path, run: StageRun, codebook: int) -> Path:
    """Code shards with a valid manifest (bench/train.py's generator: captions, long captions,
    micro-conditions, scores)."""
    spec = importlib.util.spec_from_file_location("bench_train", REPO / "bench" / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    side = run.res // 16
    return module.write_codes(folder, run.rows, 2, (side, side), codebook)


def stage_command(args: argparse.Namespace, run: StageRun, data: Path, run_dir: Path, init: Path | None) -> list[str]:
    """`train run STAGE` as a user types it, with the overrides the docstring lists."""
    stage = "debug" if args.small else run.stage
    steps = args.steps
    cmd = [sys.executable, "-m", "train.cli", "run", stage, "--config", str(REPO / "pipelines.yaml"),
           "--data", str(data), "--run-dir", str(run_dir), "--steps", str(steps),
           "--batch-size", str(run.micro * run.accum), "--micro-batch-size", str(run.micro)]
    sets = [f"log_every={max(1, steps // 20)}", f"ckpt_every={steps}", "keep_last=1", f"sample.every={steps}",
            "sample.steps=8", "sample.decode=codes", "tensorboard=false", "compile=true"]
    if args.small:
        sets += ["threads=1", "compile_backend=aot_eager"] + (["downsample=true"] if run.stage == "stage3" else [])
    else:
        sets += ["text.random=true"]  # takes precedence over the stage's text.checkpoint
    sets += [f"init_from={init}"] if init else []
    for item in sets:
        cmd += ["--set", item]
    return cmd


def steady_state(run_dir: Path, run: StageRun) -> dict:
    """Median optimizer-step time, images/s and MFU over the log windows after the first few."""
    records = read_records(run_dir)
    steady = records[SKIP_WINDOWS:] or records[-1:]
    per_step = run.micro * run.accum
    step_s = statistics.median(per_step / r["samples_per_s"] for r in steady)
    mfus = [r["mfu"] for r in steady if r.get("mfu") is not None]
    return {"step_s": step_s, "images_per_s": per_step / step_s, "mfu": statistics.median(mfus) if mfus else None,
            "windows": len(steady), "steps": records[-1]["step"] if records else 0,
            "long_caption_share": records[-1].get("long_caption_share") if records else None}


class Budget:
    """Wall-clock budget: `fits(estimate)` before a step, `cap()` as its timeout."""

    def __init__(self, seconds: float) -> None:
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()

    def fits(self, estimate: float) -> bool:
        return self.left() >= estimate


def run_logged(cmd: list[str], log: Path, timeout: float) -> tuple[int, float, str]:
    """Run a command with a timeout, its output appended to `log`; (return code, seconds, stdout)."""
    start = time.monotonic()
    try:
        done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=max(timeout, 1))
        rc, out, err = done.returncode, done.stdout, done.stderr
    except subprocess.TimeoutExpired as exc:
        rc, out, err = 124, exc.stdout or "", exc.stderr or ""
        out, err = (o.decode() if isinstance(o, bytes) else o for o in (out, err))
    with log.open("a") as f:
        f.write(f"\n$ {' '.join(cmd)}\n{out}\n--- stderr (rc {rc}) ---\n{err}\n")
    return rc, time.monotonic() - start, out


def run_stages(args: argparse.Namespace, plan: tuple[StageRun, ...], work: Path, budget: Budget) -> dict:
    results, previous = {}, None
    codebook = 64 if args.small else 8192
    for run in plan:
        if not budget.fits(run.estimate_s):
            results[run.stage] = {"skipped": f"budget ({budget.left():.0f} s left, needs ~{run.estimate_s:.0f} s)"}
            break  # the next stage starts from this one
        data = write_shards(work / f"codes{run.res}", run, codebook)
        run_dir = work / "runs" / run.stage
        rc, seconds, out = run_logged(stage_command(args, run, data, run_dir, previous), args.out / LOG,
                                      budget.left())
        summary = {"rc": rc, "wall_s": seconds, "resolution": run.res, "micro_batch": run.micro, "accum": run.accum,
                   "world": 1, "attention": next((ln for ln in out.splitlines() if ln.startswith("convention")), None)}
        if (run_dir / "metrics.jsonl").is_file():
            summary |= steady_state(run_dir, run)
            summary["records"] = read_records(run_dir)
        grids = sorted((run_dir / "samples").glob("*.png"))
        summary["sample_grid"] = [g.name for g in grids]
        summary["checkpoint"] = [p.name for p in sorted((run_dir / "checkpoints").glob("step_*"))]
        if grids and run is plan[0]:
            shutil.copy(grids[-1], args.out / f"{run.stage}_{grids[-1].name}")
        results[run.stage] = summary
        print(f"{run.stage}: {json.dumps({k: v for k, v in summary.items() if k != 'records'})}", flush=True)
        if previous is not None:
            shutil.rmtree(previous, ignore_errors=True)  # its weights are in this stage now; frees ~12 GB
        if rc != 0:
            break
        previous = run_dir
    return results


def bench(args: argparse.Namespace, name: str, extra: list[str], budget: Budget, estimate: float) -> list[dict]:
    """One bench/gpu_train.py call; its JSON lines (empty when skipped or failed)."""
    if not budget.fits(estimate):
        print(f"{name}: skipped (budget)", flush=True)
        return []
    cmd = [sys.executable, str(REPO / "bench" / "gpu_train.py"), "--compile", "--text-tower", *extra]
    if args.small:
        cmd += ["--small", "--device", "cpu", "--compile-backend", "aot_eager", "--peak-tflops", "1.0"]
    rc, _, out = run_logged(cmd, args.out / LOG, budget.left())
    rows = [json.loads(ln) for ln in out.splitlines() if ln.startswith("{")]
    print(f"{name}: rc {rc}, {len(rows)} result(s)", flush=True)
    return rows


def compare(stages: dict, plan: tuple[StageRun, ...], rows: list[dict]) -> None:
    """Trainer steady step / bench step at the same resolution, micro-batch and accumulation."""
    by_res = {r["res"]: r for r in rows}
    for run in plan:
        s, b = stages.get(run.stage, {}), by_res.get(run.res)
        if "step_s" in s and b is not None:
            s["bench_step_s"] = b["step_s_median"]
            s["trainer_over_bench"] = s["step_s"] / b["step_s_median"]


def gpu_key() -> tuple[str | None, str]:
    import torch

    from train.flops import GPU_PEAK_TFLOPS

    if not torch.cuda.is_available():
        return None, "cpu"
    name = torch.cuda.get_device_name()
    return next((k for k in GPU_PEAK_TFLOPS if k in name.lower()), None), name


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    budget = Budget(args.budget)
    plan = SMALL_PLAN if args.small else GPU_PLAN
    work = args.work or Path(tempfile.mkdtemp(prefix="gpu_stages_"))
    stages = run_stages(args, plan, work, budget)
    res = [str(r.res) for r in plan]
    same = bench(args, "bench_same_settings", ["--res", *res, "--batch-size", *(str(r.micro) for r in plan),
                                                "--accum", str(plan[0].accum), "--warmup", "3", "--steps", "10"],
                 budget, 90)
    compare(stages, plan, same)
    first = plan[0]
    det = bench(args, "bench_deterministic", ["--res", str(first.res), "--batch-size", str(first.micro), "--accum",
                                              str(first.accum), "--deterministic", "--warmup", "3", "--steps", "10"],
                budget, 75)
    base = next((r for r in same if r["res"] == first.res), None)
    deterministic = ({"step_s": det[0]["step_s_median"], "default_step_s": base["step_s_median"],
                      "slowdown": det[0]["step_s_median"] / base["step_s_median"]} if det and base else None)
    mfu_res = [str(r) for r in MFU_BATCHES] if not args.small else [str(first.res)]
    mfu_batches = [str(MFU_BATCHES[int(r)]) for r in mfu_res] if not args.small else ["8"]
    mfu = bench(args, "bench_stage_micro_batches", ["--res", *mfu_res, "--batch-size", *mfu_batches,
                                                     "--warmup", "3", "--steps", "10"], budget, 100)
    key, device = gpu_key()
    measured = {"gpu": key, "device": device, "stages": {k: v for k, v in stages.items() if "step_s" in v},
                "deterministic": deterministic, "bench_same_settings": same, "bench_stage_micro_batches": mfu,
                "skipped_or_failed": {k: v for k, v in stages.items() if "step_s" not in v}}
    (args.out / "measured.json").write_text(json.dumps(measured, indent=2) + "\n")
    print(json.dumps({"summary": {k: {f: v.get(f) for f in ("step_s", "images_per_s", "mfu", "trainer_over_bench")}
                                  for k, v in measured["stages"].items()}, "deterministic": deterministic}))
    if key and measured["stages"]:
        subprocess.run([sys.executable, "-m", "train.cli", "plan", "--measured", str(args.out / "measured.json"),
                        "--config", str(REPO / "pipelines.yaml")], cwd=REPO)
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
