"""Metadata commands of `curate`: synth, dedup, filter, captions, run.

Thin commands: parse options (all default to None = "not given"), build the step's config
with the one precedence (defaults < pipelines.yaml < flags), start or join Ray, call `run`.
User errors print one line and exit 2.
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any, Iterator, Optional

import typer
from rich.console import Console

from core import config
from core.ledger import LedgerMismatchError
from curate._app import app
from curate.metadata_io import MetadataError
from curate.steps import StepIncomplete

err = Console(stderr=True)

ConfigOpt = typer.Option(None, "--config", "-c", help="pipelines.yaml to read (default: ./pipelines.yaml, else the repository's)")
RayOpt = typer.Option(None, "--ray-address", help="Ray cluster to join (default: RAY_ADDRESS, then pipelines.yaml ray.address, else a local Ray)")
InputOpt = typer.Option(..., "--input", "-i", help="input parquet: a file, a folder (files starting with _ or . skipped) or a glob")
OutputOpt = typer.Option(..., "--output", "-o", help="output folder: kept rows as part-*.parquet, bookkeeping under _*")
ThreadsOpt = typer.Option(None, "--threads", help="duckdb threads (and Ray CPUs) per task [default: 1]")
MemoryOpt = typer.Option(None, "--memory", help="duckdb memory limit per task, e.g. 2GB [default: 1GB]")


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Print a user-fixable error as one red line and exit 2 (Ray wraps task errors: unwrap)."""
    try:
        yield
    except (config.ConfigError, MetadataError, ValueError, FileNotFoundError) as exc:
        cause = getattr(exc, "cause", None) or exc
        err.print(f"[red]error:[/red] {cause}", soft_wrap=True, markup=True, highlight=False)
        raise typer.Exit(2) from None
    except (StepIncomplete, LedgerMismatchError) as exc:
        err.print(f"[red]incomplete:[/red] {exc}", soft_wrap=True, markup=True, highlight=False)
        raise typer.Exit(1) from None


def ray_address(cli: str | None, doc: dict[str, Any]) -> str | None:
    """--ray-address > RAY_ADDRESS (set by `ray job submit`) > pipelines.yaml ray.address."""
    return cli or os.environ.get("RAY_ADDRESS") or config.section(doc, "ray").get("address")


def run_step(name: str, flags: dict[str, Any], inp: str, out: str, config_path: Path | None,
             address: str | None) -> dict[str, Any]:
    """Build step `name`'s config (defaults < yaml section < flags), start Ray, run it."""
    from core.ray_util import init_ray
    from curate.steps import get_step

    doc = config.load_yaml(config_path)
    step = get_step(name)
    cfg = config.merge(step.config, config.section(doc, step.section), flags, where=f"curate {name}")
    init_ray(ray_address(address, doc))
    return step.run(cfg, inp, out)


@app.command()
def synth(
    output: Path = typer.Option(..., "--output", "-o", help="folder for part-*.parquet"),
    rows: Optional[int] = typer.Option(None, "--rows", "-n", help="total rows [default: 100000]"),
    files: Optional[int] = typer.Option(None, "--files", help="number of files [default: 4]"),
    seed: Optional[int] = typer.Option(None, "--seed", help="random seed [default: 0]"),
    dup_rate: Optional[float] = typer.Option(None, "--dup-rate", help="share of rows reusing another row's URL [default: 0.1]"),
    missing_rate: Optional[float] = typer.Option(None, "--missing-rate", help="share of rows missing each score [default: 0.02]"),
    null_rate: Optional[float] = typer.Option(None, "--null-rate", help="share of rows with null URL (and null TEXT) [default: 0.0001]"),
    captions_output: Optional[Path] = typer.Option(None, "--captions-output", help="also write a matching long-caption table (url, caption) to this parquet file"),
    config_path: Optional[Path] = ConfigOpt,
) -> None:
    """Generate LAION-like metadata (real column names and dtypes) with planted duplicates,
    missing scores and null URL/TEXT rows, for tests, the demo and benchmarks."""
    from curate import synth as synth_mod

    with user_errors():
        doc = config.load_yaml(config_path)
        flags = dict(rows=rows, files=files, seed=seed, dup_rate=dup_rate, missing_rate=missing_rate, null_rate=null_rate)
        cfg = config.merge(synth_mod.SynthConfig, config.section(doc, "curate.synth"), flags, where="curate synth")
        summary = synth_mod.run(cfg, output, captions_output)
    Console().print(f"wrote {summary['rows']:,} rows in {len(summary['files'])} files to {output}"
                    + (f"; {summary['captions']['rows']:,} captions to {captions_output}" if captions_output else ""))


@app.command()
def dedup(
    input: str = InputOpt,
    output: str = OutputOpt,
    key: Optional[str] = typer.Option(None, "--key", help="url (trimmed) | url_text | hash [default: url]"),
    buckets: Optional[int] = typer.Option(None, "--buckets", help="hash partitions; 0 = rows / rows-per-bucket [default: 0]"),
    rows_per_bucket: Optional[int] = typer.Option(None, "--rows-per-bucket", help="rows per partition when --buckets is 0 [default: 500000]"),
    threads: Optional[int] = ThreadsOpt,
    memory: Optional[str] = MemoryOpt,
    config_path: Optional[Path] = ConfigOpt,
    address: Optional[str] = RayOpt,
) -> None:
    """Exact dedup across all input files: keeps the row with the highest aesthetic, then
    highest similarity, then smallest hash; every dropped row is a `duplicate` in the ledger."""
    flags = dict(key=key, buckets=buckets, rows_per_bucket=rows_per_bucket, threads=threads, memory=memory)
    with user_errors():
        run_step("dedup", flags, input, output, config_path, address)


@app.command("filter")
def filter_(
    input: str = InputOpt,
    output: str = OutputOpt,
    aesthetic: Optional[float] = typer.Option(None, "--aesthetic", help="keep aesthetic (or AESTHETIC_SCORE) >= A [default: 4.5]"),
    watermark: Optional[float] = typer.Option(None, "--watermark", help="keep pwatermark <= W [default: 0.5]"),
    punsafe: Optional[float] = typer.Option(None, "--punsafe", help="keep punsafe <= P [default: off]"),
    min_side: Optional[int] = typer.Option(None, "--min-side", help="keep min(WIDTH, HEIGHT) >= N [default: off]"),
    max_aspect: Optional[float] = typer.Option(None, "--max-aspect", help="keep max(W,H)/min(W,H) <= R [default: off]"),
    similarity: Optional[float] = typer.Option(None, "--similarity", help="keep similarity >= S [default: off]"),
    min_words: Optional[int] = typer.Option(None, "--min-words", help="keep TEXT with >= N words [default: off]"),
    threads: Optional[int] = ThreadsOpt,
    memory: Optional[str] = MemoryOpt,
    config_path: Optional[Path] = ConfigOpt,
    address: Optional[str] = RayOpt,
) -> None:
    """Keep rows passing every threshold; a missing/NaN score drops the row as missing:<column>.
    Rules apply in the order aesthetic, watermark, punsafe, min_side, max_aspect, similarity,
    min_words; the ledger records the first failing one and its value."""
    flags = dict(aesthetic=aesthetic, watermark=watermark, punsafe=punsafe, min_side=min_side,
                 max_aspect=max_aspect, similarity=similarity, min_words=min_words, threads=threads, memory=memory)
    with user_errors():
        run_step("filter", flags, input, output, config_path, address)


@app.command()
def captions(
    input: str = InputOpt,
    output: str = OutputOpt,
    captions_path: Optional[str] = typer.Option(None, "--captions", help="long-caption table: parquet file, folder or glob"),
    join_on: Optional[str] = typer.Option(None, "--join-on", help="url | hash | sha256 | key [default: url]"),
    captions_key: Optional[str] = typer.Option(None, "--captions-key", help="key column of the caption table [default: same as --join-on]"),
    caption_column: Optional[str] = typer.Option(None, "--caption-column", help="text column of the caption table [default: first of long_caption, caption, re_caption, vlm_caption, text]"),
    min_words: Optional[int] = typer.Option(None, "--min-words", help="ignore captions with fewer words [default: 50]"),
    threads: Optional[int] = ThreadsOpt,
    memory: Optional[str] = MemoryOpt,
    config_path: Optional[Path] = ConfigOpt,
    address: Optional[str] = RayOpt,
) -> None:
    """Left-join long captions (normalised: NFC, whitespace) as `long_caption`; several captions
    for one key: the longest wins, then the lexicographically first. Prints the match rate."""
    flags = dict(captions=captions_path, join_on=join_on, captions_key=captions_key, caption_column=caption_column,
                 min_words=min_words, threads=threads, memory=memory)
    with user_errors():
        run_step("captions", flags, input, output, config_path, address)


@app.command("run")
def run_pipeline(
    pipeline: str = typer.Option("demo", "--pipeline", "-p", help="name under `pipelines:` in the config"),
    config_path: Optional[Path] = ConfigOpt,
    address: Optional[str] = RayOpt,
) -> None:
    """Run a named pipeline of pipelines.yaml: its steps in order, each reading the previous
    one's output, then print a summary of every step."""
    from core.ray_util import init_ray
    from curate import pipeline as pipeline_mod

    with user_errors():
        doc = config.load_yaml(config_path)
        pipeline_mod.plan(doc, pipeline)  # every step's config checked before Ray starts
        init_ray(ray_address(address, doc))
        pipeline_mod.run(doc, pipeline)
