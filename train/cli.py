"""`train`: run a training stage, sample from a checkpoint, plan GPU-days.

    train run debug --data codes/ --run-dir runs/debug
    torchrun --nproc-per-node 8 -m train.cli run stage1 --data codes256/
    train sample --checkpoint runs/stage1 --prompt "a red fox" --out fox.png
    train plan stage1 --gpus 64 --gpu h100 --mfu 0.4
    train plan --measured gpu_results/measured.json --gpus 64   # stages 1-3 from measured step times
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console
from rich.table import Table

from core.cli import tidy_help, user_errors
from core.config import ConfigError, deep_merge, given, parse_sets

app = typer.Typer(help="Train the Meissonic transformer on code shards.", add_completion=False,
                  no_args_is_help=True)
console = Console()


@app.command("run")
def run_cmd(
    stage: str = typer.Argument(..., help="Stage name in pipelines.yaml train.stages: debug, stage1, stage2, stage3."),
    config: Optional[Path] = typer.Option(None, "--config", help="pipelines.yaml to read (default: ./pipelines.yaml, else the repo's)."),
    run_dir: Optional[Path] = typer.Option(None, "--run-dir", help="Run folder (default runs/STAGE); an existing one is resumed."),
    data: Optional[str] = typer.Option(None, "--data", help="Code-shard folder (pretokenize output); sets data.path."),
    steps: Optional[int] = typer.Option(None, "--steps", help="Optimizer steps of the stage."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="GLOBAL batch (all GPUs, per optimizer step)."),
    micro_batch_size: Optional[int] = typer.Option(None, "--micro-batch-size", help="Per-GPU micro-batch; accumulation fills the global batch."),
    sets: Optional[list[str]] = typer.Option(None, "--set", help="Override any config key: --set optim.lr=3.0e-4 --set ema.enabled=true (floats need a dot: YAML reads 3e-4 as text)."),
) -> None:
    """Train STAGE, resuming from the latest checkpoint in its run folder."""
    from train.stages import load_stage
    from train.trainer import run

    flags: dict[str, Any] = {"data": {"path": data}, "steps": steps, "batch_size": batch_size,
                             "micro_batch_size": micro_batch_size}
    with user_errors("checkpoints are kept; rerun the same command to resume from the latest"):
        cfg = load_stage(stage, config, deep_merge(given(flags), parse_sets(sets)))
        summary = run(cfg, stage, run_dir or Path("runs") / stage)
    console.print(f"done: step {summary['step']}, checkpoint {summary['checkpoint']}")


MAX_PICTURES = 1024  # pictures of one `train sample` call (one batch, one grid)


@app.command("sample")
def sample_cmd(
    checkpoint: Path = typer.Option(..., "--checkpoint", help="A checkpoint folder, or a run folder (its latest checkpoint)."),
    prompt: list[str] = typer.Option(..., "--prompt", help="A prompt; repeat for several (one grid row each)."),
    out: Path = typer.Option(..., "--out", help="Output PNG grid."),
    steps: int = typer.Option(48, "--steps", help="MaskGIT decoding steps."),
    cfg: Optional[float] = typer.Option(None, "--cfg", help="Classifier-free guidance scale (default: the run's stage's sample.cfg, 3 for debug; 9 for the Meissonic stages and releases)."),
    seed: int = typer.Option(0, "--seed", help="Sampling noise seed."),
    n: int = typer.Option(4, "--n", help="Images per prompt."),
    negative_prompt: str = typer.Option("", "--negative-prompt", help="Negative prompt (default: the empty prompt)."),
    vq: Optional[str] = typer.Option(None, "--vq", help="VQ folder (default: the tokenizer recorded with the training data)."),
    decode: str = typer.Option("vq", "--decode", help="vq: decode to pixels; codes: false-colour code maps (no VQ needed)."),
    ema: Optional[bool] = typer.Option(None, "--ema/--no-ema", help="Sample with the checkpoint's EMA weights, or its raw weights (default: the EMA weights when the run kept them)."),
) -> None:
    """Generate images for prompts from a trained checkpoint and save them as one grid."""
    from core import atomic
    from train.sampler import sample_to_file

    with user_errors():
        if decode not in ("vq", "codes"):
            raise ConfigError(f"--decode must be vq or codes, got {decode!r}")
        if steps < 1 or n < 1:
            raise ConfigError(f"--steps and --n must be >= 1, got --steps {steps} --n {n}")
        if n * len(prompt) > MAX_PICTURES:  # all are sampled as one batch and drawn in one grid
            raise ConfigError(f"--n {n:,} x {len(prompt)} prompt(s) = {n * len(prompt):,} pictures; one grid holds "
                              f"at most {MAX_PICTURES:,}: sample in several runs with other --seed values")
        if cfg is not None and not (math.isfinite(cfg) and cfg >= 0):
            raise ConfigError(f"--cfg must be a finite number >= 0 (1 = no guidance), got {cfg}")
        if out.is_dir():  # checked before minutes of sampling, not at the final rename
            raise ConfigError(f"{out}: is a folder; --out names the PNG file to write, e.g. {out / 'grid.png'}")
        blocker = atomic.file_in_the_way(out)
        if blocker is not None:
            raise ConfigError(f"{out}: cannot be written: {blocker} is a file")
        if out.suffix.lower() not in ("", ".png"):
            raise ConfigError(f"{out}: the grid is written as PNG; name it *.png")
        path, used = sample_to_file(checkpoint, prompt, out, steps=steps, cfg=cfg, seed=seed, n=n,
                                    negative_prompt=negative_prompt, vq_path=vq, decode=decode, ema=ema)
    console.print(f"wrote {path} (from {used['checkpoint']}, {used['weights']} weights, cfg {used['cfg']:g})")


@app.command("plan")
def plan_cmd(
    stage: Optional[str] = typer.Argument(None, help="Stage name (stage1, stage2, stage3); with --measured: default all measured stages."),
    gpus: int = typer.Option(1, "--gpus", help="Number of GPUs (divides the wall-clock days)."),
    gpu: str = typer.Option("h100", "--gpu", help="h100, h200 or a100 (with --measured: the file's GPU)."),
    mfu: float = typer.Option(0.4, "--mfu", help="Model-FLOPs utilisation, measured (bench/gpu_train.py) or assumed."),
    measured: Optional[Path] = typer.Option(None, "--measured", help="JSON of measured step times (bench/gpu_stages.py writes it): GPU-days from those instead of an MFU."),
    config: Optional[Path] = typer.Option(None, "--config", help="pipelines.yaml to read."),
) -> None:
    """Estimate GPU-days of a stage from its FLOPs per token, or of stages 1-3 from measured step times."""
    from train.stages import load_stage, plan_stage

    with user_errors():
        if gpus < 1:
            raise ConfigError(f"--gpus must be >= 1, got {gpus}")
        gpu = gpu.lower()
        if measured is not None:
            try:
                _plan_measured(measured, stage, gpus, config)
            except ConfigError:
                raise
            except (ValueError, KeyError, TypeError, AttributeError) as exc:  # not what bench/gpu_stages.py writes
                raise ConfigError(f"{measured}: not a measurement file as bench/gpu_stages.py writes it "
                                  f"({type(exc).__name__}: {exc})") from None
            return
        if stage is None:
            raise ConfigError("give a STAGE, or --measured FILE")
        try:
            result = plan_stage(load_stage(stage, config), gpus, gpu, mfu)
        except ValueError as exc:  # an unknown GPU or an MFU outside (0, 1]
            raise ConfigError(str(exc)) from exc
    table = Table(title=f"plan: {stage} on {gpus} x {gpu.upper()} at {mfu:.0%} MFU")
    table.add_column("quantity")
    table.add_column("value", justify="right")
    for key, value in result.items():
        table.add_row(key, f"{value:,.4g}" if isinstance(value, float) else str(value))
    console.print(table)


def _plan_measured(path: Path, stage: str | None, gpus: int, config: Path | None) -> None:
    """The --measured table: one row per stage and the total, beside the goal and the paper."""
    import json

    from train.flops import GOAL_H100_DAYS, PAPER_H100_DAYS
    from train.stages import load_stage, plan_measured

    doc = json.loads(path.read_text())
    names = [stage] if stage else sorted(doc["stages"])
    missing = [n for n in names if n not in doc["stages"]]
    if missing:
        raise ConfigError(f"{path}: no measurement for {', '.join(missing)} (has {', '.join(sorted(doc['stages']))})")
    rows = {n: plan_measured(load_stage(n, config), doc["stages"][n], doc["gpu"], gpus) for n in names}
    table = Table(title=f"plan from {path} ({doc.get('device', doc['gpu'])}), {gpus} GPU(s)")
    for col in ("stage", "measured micro x accum", "images/s/GPU", "MFU", "images", f"{doc['gpu'].upper()}-days",
                "wall days"):
        table.add_column(col, justify="right")
    for n, r in rows.items():
        m = doc["stages"][n]
        table.add_row(n, f"{m['micro_batch']} x {m['accum']}", f"{r['images_per_s_per_gpu']:,.1f}", f"{r['mfu']:.1%}",
                      f"{r['images']:,}", f"{r['gpu_days']:.2f}", f"{r['wall_days']:.2f}")
    total = sum(r["gpu_days"] for r in rows.values())
    table.add_row("total", "", "", "", "", f"{total:.2f}", f"{total / gpus:.2f}")
    console.print(table)
    console.print(f"goal <= {GOAL_H100_DAYS:g} H100-days; the paper: {PAPER_H100_DAYS:g} H100-days "
                  f"(measured stages only; linear scaling over GPUs assumed)")


tidy_help(app)

if __name__ == "__main__":
    app()
