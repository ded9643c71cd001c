"""The `pretokenize` command: `pretokenize --res 512 --input SHARDS --output CODES` encodes;
`pretokenize check ...` and `pretokenize fit-vq ...` are its sub-commands. Thin: parse the
options, merge defaults < pipelines.yaml (section `pretokenize`) < flags, call one `run`."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console

from core import config as C
from core import ledger
from core.cli import RAY_ADDRESS_HELP, ray_address, tidy_help, user_errors
from core.imageshard import list_shards

app = typer.Typer(
    help="Encode image shards into VQ code shards: pretokenize --res 512 --input SHARDS --output CODES --vq VQDIR. "
    "Sub-commands check the result or fit a small tokenizer. See docs/pretokenize.md.",
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console(stderr=True, soft_wrap=True)  # no hard wraps: paths in errors stay copyable
SUBSECTIONS = ("check", "fit_vq")  # nested under `pretokenize:` in pipelines.yaml


def yaml_section(config: Optional[Path], sub: str | None = None) -> dict[str, Any]:
    """`pretokenize` (minus its sub-sections) or `pretokenize.<sub>` of pipelines.yaml."""
    section = C.section(C.load_yaml(config), "pretokenize")
    if sub is not None:
        return C.section(section, sub)
    return {k: v for k, v in section.items() if k not in SUBSECTIONS}


@app.callback(invoke_without_command=True)
def main(
    ctx: typer.Context,
    input: Optional[str] = typer.Option(None, "--input", "-i", help="Image shards: a folder of webdataset *.tar (img2dataset output) or one tar; a local path or s3:// / gs:// URI."),
    output: Optional[str] = typer.Option(None, "--output", "-o", help="Code folder to write (NNNNN.arrow + manifest.json), local or s3:// / gs://; a rerun resumes."),
    res: Optional[int] = typer.Option(None, "--res", help="Square side in pixels (default 512); a multiple of the tokenizer's downsampling factor."),
    vq: Optional[str] = typer.Option(None, "--vq", help="VQ tokenizer folder (config.json + diffusion_pytorch_model.safetensors); default pretokenize.vq in pipelines.yaml."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Images per encoder call (default 32)."),
    crop: Optional[str] = typer.Option(None, "--crop", help="center (default) or random (seeded per sample, recorded)."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Base seed of random crops (default 0)."),
    keep_list: Optional[str] = typer.Option(None, "--keep-list", help="Parquet with key, shard columns (curate neardup's keep.parquet): encode only those."),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="Encoder precision: fp32 (the only one offered; see docs)."),
    executor: Optional[str] = typer.Option(None, "--executor", help="ray (default: actors, local or cluster) or local (in-process)."),
    num_actors: Optional[int] = typer.Option(None, "--num-actors", help="Actors to start (default: one per GPU, else CPUs / cpus-per-actor)."),
    cpus_per_actor: Optional[int] = typer.Option(None, "--cpus-per-actor", help="CPUs per actor (default auto)."),
    decode_threads: Optional[int] = typer.Option(None, "--decode-threads", help="Decode/resize threads per actor (default: the actor's CPUs)."),
    allow_upscale: Optional[bool] = typer.Option(None, "--allow-upscale", help="Encode images with fewer pixels than --res by upscaling them (default: filtered as too_small)."),
    allow_incomplete: Optional[bool] = typer.Option(None, "--allow-incomplete", help="Encode the shards of an unfinished download folder (no _stats.json) as they are."),
    address: Optional[str] = typer.Option(None, "--ray-address", help=RAY_ADDRESS_HELP),
    config: Optional[Path] = typer.Option(None, "--config", help="pipelines.yaml to read (default ./pipelines.yaml, else the repo's)."),
) -> None:
    """Encode image shards into VQ code shards: `pretokenize --res 512 --input SHARDS --output CODES --vq VQDIR`."""
    if ctx.invoked_subcommand is not None:
        return
    if input is None or output is None:
        console.print(ctx.get_help())
        console.print("[red]error:[/red] --input and --output are required to encode")
        raise typer.Exit(2)
    from pretokenize.run import PretokenizeConfig, run

    flags = dict(res=res, vq=vq, batch_size=batch_size, crop=crop, seed=seed, keep_list=keep_list, dtype=dtype,
                 executor=executor, num_actors=num_actors, cpus_per_actor=cpus_per_actor, decode_threads=decode_threads,
                 allow_upscale=allow_upscale, allow_incomplete=allow_incomplete)
    with user_errors():
        cfg = C.merge(PretokenizeConfig, yaml_section(config), C.given(flags), where="pretokenize")
        stats = run(cfg, input, output, ray_address(address, C.load_yaml(config)))
    ledger.print_counts(stats, console)
    for name, why in stats.get("damaged_shards", {}).items():
        console.print(f"[yellow]warning:[/yellow] shard {name} is damaged ({why}); its readable samples, if any, "
                      "were kept (the ledger has a row for each)")
    if stats.get("sizes_corrected"):
        console.print(f"[yellow]warning:[/yellow] {stats['sizes_corrected']:,} kept image(s) had an original size in "
                      "their .json that does not fit the image (EXIF-turned, or wrong); their micro-conditions use the "
                      "corrected size, and the ledger names them (reason orig_size_rotated or orig_size_mismatch)")
    if not stats["kept"] and stats.get("too_small"):
        console.print(f"[yellow]warning:[/yellow] no image was encoded: {stats['too_small']:,} were smaller than "
                      f"--res {cfg.res} (ledger reason too_small); give a smaller --res, or --allow-upscale")
    console.print(f"wrote {stats['kept']:,} code rows ({stats['grid'][0]}x{stats['grid'][1]} tokens) to {output}")


@app.command("check")
def check_cmd(
    input: Path = typer.Option(..., "--input", "-i", help="Code folder written by pretokenize."),
    n: Optional[int] = typer.Option(None, "--n", help="Samples to decode and compare (default 16)."),
    vq: Optional[str] = typer.Option(None, "--vq", help="VQ folder (default: the one recorded in the manifest; its hash must match)."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Where to write PNGs and check.json (default INPUT/_check)."),
    usage_rows: Optional[int] = typer.Option(None, "--usage-rows", help="Rows sampled for codebook usage (default 10000)."),
    config: Optional[Path] = typer.Option(None, "--config", help="pipelines.yaml to read."),
) -> None:
    """Decode samples back to pixels: side-by-side PNGs (input | reconstruction), PSNR, codebook usage."""
    from pretokenize.check import CheckConfig, run_check

    with user_errors():
        cfg = C.merge(CheckConfig, yaml_section(config, "check"), C.given(dict(n=n, vq=vq, usage_rows=usage_rows)),
                      where="pretokenize.check")
        report = run_check(cfg, input, output)
    from pretokenize.check import print_report

    print_report(report, console)


@app.command("fit-vq")
def fit_vq_cmd(
    input: Path = typer.Option(..., "--input", "-i", help="Image shards to fit on (webdataset *.tar)."),
    output: Path = typer.Option(..., "--output", "-o", help="New VQ folder to write (loadable by pretokenize --vq)."),
    codebook: Optional[int] = typer.Option(None, "--codebook", help="Codebook size (default 256)."),
    downsample: Optional[int] = typer.Option(None, "--downsample", help="Pixels per token side, a power of 2 (default 4: 64 px -> 16x16 tokens)."),
    steps: Optional[int] = typer.Option(None, "--steps", help="Optimiser steps (default 2500, ~2.5 min on 2 CPU cores)."),
    res: Optional[int] = typer.Option(None, "--res", help="Image side in pixels (shorter side resized to it; default 64); PSNR is measured at res x res."),
    crop: Optional[int] = typer.Option(None, "--crop", help="Training crop side in pixels (default 32)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Crops per step (default 16)."),
    width: Optional[int] = typer.Option(None, "--width", help="Channels of the first encoder block (default 16)."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Random seed (default 0)."),
    config: Optional[Path] = typer.Option(None, "--config", help="pipelines.yaml to read."),
) -> None:
    """Fit a small VQModel (MSE + commitment loss, EMA codebook, dead-code restarts); PSNR on held-out images."""
    from pretokenize.fitvq import FitVQConfig, fit_vq

    flags = dict(codebook=codebook, downsample=downsample, steps=steps, res=res, crop=crop, batch_size=batch_size,
                 width=width, seed=seed)
    with user_errors():
        cfg = C.merge(FitVQConfig, yaml_section(config, "fit_vq"), C.given(flags), where="pretokenize.fit_vq")
        list_shards(input)
        result = fit_vq(cfg, input, output)
    console.print(
        f"saved VQ ({cfg.codebook} codes, f{cfg.downsample}) to {output}: held-out PSNR {result['psnr']:.2f} dB "
        f"on {result['held_out_images']} images, codes used {result['codes_used']}/{cfg.codebook}, "
        f"{result['seconds']:.0f} s"
    )


tidy_help(app)
