"""Proof of learning: does the chain learn caption -> image, for captions it never saw?

The shapes world (scripts/shapes_world.py: 3 shapes x 6 colours x 5 backgrounds, 64 px) with
some (shape, colour, background) combinations held out of training goes through every command
with its defaults, except the step counts:

    pretokenize fit-vq -> pretokenize --res 64 -> train run debug -> train sample

Then `train sample` renders the held-out prompts (and, as a control, as many training prompts)
with several seeds, and `shapes_world.judge` checks each image's pixels against its prompt:
background colour, shape colour, and the shape by how much of its bounding box it fills. Goal:
>= 90% of held-out images right after <= 10 min of CPU training.

The images are written as download-style shards directly (`demo_web.write_shards`): `make demo`
runs the same world through `curate run --pipeline demo-shapes` (HTTP, img2dataset); here the
interest is the learning. CPU seconds are the children's user+sys time (getrusage).

    .venv/bin/python bench/toy_t2i.py [--train-steps 6000] [--vq-steps N] [--seeds 4] \
        [--work bench/_work/toy_t2i] [--figures bench/figures]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))

import demo_web  # noqa: E402
import shapes_world as W  # noqa: E402

SIZE = 64  # pixels per side: the world's images and the pretokenize resolution


def command(name: str, *args: str) -> list[str]:
    """A console script of this venv (next to the interpreter), as a user would type it."""
    return [str(Path(sys.executable).parent / name), *args]


def timed(cmd: list[str], log: Path) -> dict[str, float]:
    """Run cmd (this tree first on the path), output to `log`; wall and CPU seconds."""
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", NO_ALBUMENTATIONS_UPDATE="1",
               RAY_USAGE_STATS_ENABLED="0", RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")
    before, wall = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
    with open(log, "w") as out:
        done = subprocess.run(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode:
        sys.exit(f"{' '.join(cmd)} failed ({done.returncode}); see {log}:\n{log.read_text()[-3000:]}")
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    return {"wall_s": round(time.perf_counter() - wall, 1), "cpu_s": round(cpu, 1)}


def summary(verdicts: list[dict]) -> dict[str, float]:
    """Shares of images right (colours + shape), with the colours right, and of prompts whose
    images are right for at least half the seeds."""
    prompts = sorted({v["prompt"] for v in verdicts})
    per_prompt = [np.mean([v["right"] for v in verdicts if v["prompt"] == p]) for p in prompts]
    return {"images": len(verdicts), "right": float(np.mean([v["right"] for v in verdicts])),
            "colours_right": float(np.mean([v["colours_right"] for v in verdicts])),
            "prompts_right_majority": float(np.mean([s >= 0.5 for s in per_prompt]))}


def sample_and_judge(work: Path, name: str, prompts: list[str], seeds: int) -> tuple[dict, list[dict]]:
    grid = work / f"{name}.png"
    args = ["sample", "--checkpoint", str(work / "run"), "--out", str(grid), "--n", str(seeds)]
    for p in prompts:
        args += ["--prompt", p]
    t = timed(command("train", *args), work / f"sample_{name}.log")
    verdicts = W.judge_grid(grid, prompts, seeds)
    return dict(summary(verdicts), **t), verdicts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train-steps", type=int, default=6000, help="train run debug --steps")
    ap.add_argument("--vq-steps", type=int, default=None, help="fit-vq --steps (default: fit-vq's default)")
    ap.add_argument("--per-combo", type=int, default=30, help="training images per combination")
    ap.add_argument("--holdout", type=int, default=6, help="combinations held out")
    ap.add_argument("--seeds", type=int, default=4, help="images per prompt (train sample --n)")
    ap.add_argument("--seed", type=int, default=0, help="world seed (which combinations are held out)")
    ap.add_argument("--work", type=Path, default=REPO / "bench" / "_work" / "toy_t2i")
    ap.add_argument("--figures", type=Path, default=None, help="copy the loss curve and grids here")
    ap.add_argument("--resume", action="store_true",
                    help="keep --work and skip the commands that finished there (their times are in times.json)")
    args = ap.parse_args()

    work = args.work
    if not args.resume:
        shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    held = [c.caption for c in W.held_out(args.holdout, args.seed)]
    if not (work / "shards").is_dir():
        items = W.training_items(args.per_combo, args.holdout, args.seed)
        demo_web.write_shards(work / "shards", items, SIZE, seed=args.seed)
    images = args.per_combo * (len(W.all_combos()) - args.holdout)
    print(f"world: {images} training images, held out: {held}", flush=True)

    times_file = work / "times.json"
    times = json.loads(times_file.read_text()) if times_file.is_file() else {}
    vq_steps = ["--steps", str(args.vq_steps)] if args.vq_steps else []
    stages = {  # name -> (command, what exists once it finished)
        "fit_vq": (command("pretokenize", "fit-vq", "--input", str(work / "shards"), "--output", str(work / "vq"),
                           *vq_steps), work / "vq" / "fit_report.json"),
        "pretokenize": (command("pretokenize", "--res", str(SIZE), "--input", str(work / "shards"), "--output",
                                str(work / "codes"), "--vq", str(work / "vq")), work / "codes" / "manifest.json"),
        "train": (command("train", "run", "debug", "--data", str(work / "codes"), "--run-dir", str(work / "run"),
                          "--steps", str(args.train_steps)), work / "run" / "checkpoints" / f"step_{args.train_steps:08d}"),
    }
    for name, (cmd, done) in stages.items():
        if name in times and done.exists():
            print(f"{name}: done before, {times[name]}", flush=True)
            continue
        times[name] = timed(cmd, work / f"{name}.log")
        times_file.write_text(json.dumps(times, indent=1))
        print(f"{name}: {times[name]}", flush=True)
    fit = json.loads((work / "vq" / "fit_report.json").read_text())
    print(f"fit-vq: held-out PSNR {fit['psnr']:.2f} dB", flush=True)

    # Control: as many training combinations, spread over the list, rendered the same way.
    trained = [c.caption for c in W.all_combos() if c.caption not in held]
    control = [trained[i] for i in np.linspace(0, len(trained) - 1, len(held)).round().astype(int)]
    held_res, held_v = sample_and_judge(work, "held_out", held, args.seeds)
    ctrl_res, ctrl_v = sample_and_judge(work, "training", control, args.seeds)
    losses = [json.loads(line) for line in open(work / "run" / "metrics.jsonl") if '"loss"' in line]
    result = {"world_images": images, "held_out": held, "fit_vq": fit, "times": times,
              "train_steps": args.train_steps, "final_loss": losses[-1]["loss"],
              "held_out_result": held_res, "training_result": ctrl_res, "verdicts": held_v + ctrl_v}
    (work / "result.json").write_text(json.dumps(result, indent=1))
    if args.figures:
        args.figures.mkdir(parents=True, exist_ok=True)
        for src, dst in (("run/loss.png", "toy_t2i_loss.png"), ("held_out.png", "toy_t2i_held_out.png"),
                         ("training.png", "toy_t2i_training.png")):
            shutil.copy(work / src, args.figures / dst)
    print(json.dumps({k: result[k] for k in ("times", "final_loss", "held_out_result", "training_result")}, indent=1))
    for v in held_v:
        print(f"  {v['prompt']:42s} seed {v['seed']}: {v['colour']:>6} {v['shape']:>8} on {v['background']:>6} "
              f"{'right' if v['right'] else 'WRONG'}")


if __name__ == "__main__":
    main()
