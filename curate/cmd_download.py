"""`curate download`: a thin command over `curate.download.run`.

Options default to None ("not given"), so the precedence is defaults < pipelines.yaml
`curate.download` < flags. User errors print one line and exit 2; shards left unfinished
print which and why, and exit 1 (rerun the same command to redo them).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from core import config, ledger
from curate._app import app
from curate.cmd_metadata import user_errors


@app.command()
def download(
    input: Path = typer.Option(..., "--input", "-i", help="parquet folder of a previous curate step (IN/*.parquet, _ names skipped) or one file"),
    output: Path = typer.Option(..., "--output", "-o", help="output folder: NNNNN.tar/.parquet/_stats.json shards, bookkeeping under _*"),
    image_size: Optional[int] = typer.Option(None, "--image-size", help="output side in pixels \\[default: 512]"),
    resize_mode: Optional[str] = typer.Option(None, "--resize-mode", help="center_crop | keep_ratio | keep_ratio_largest | border | no \\[default: center_crop]"),
    processes: Optional[int] = typer.Option(None, "--processes", help="local worker processes \\[default: all CPUs; ignored on Ray]"),
    threads: Optional[int] = typer.Option(None, "--threads", help="download threads per process \\[default: 64]"),
    retry_failed: Optional[bool] = typer.Option(None, "--retry-failed", help="after the run, re-queue transient failures (timeouts, 408/429, 5xx, resets) into new shards"),
    samples_per_shard: Optional[int] = typer.Option(None, "--samples-per-shard", help="input rows per shard \\[default: 10000]"),
    timeout: Optional[float] = typer.Option(None, "--timeout", help="seconds a connection may stall \\[default: 10]"),
    retries: Optional[int] = typer.Option(None, "--retries", help="immediate retries of a transient failure \\[default: 2]"),
    max_bytes: Optional[int] = typer.Option(None, "--max-bytes", help="largest body accepted, bytes \\[default: 67108864]"),
    max_pixels: Optional[int] = typer.Option(None, "--max-pixels", help="largest width*height decoded, from the header \\[default: 100000000]"),
    config_path: Optional[Path] = typer.Option(None, "--config", "-c", help="pipelines.yaml to read (default: ./pipelines.yaml, else the repository's)"),
    ray_address: Optional[str] = typer.Option(None, "--ray-address", help="Ray cluster to run img2dataset's Ray distributor on (default: RAY_ADDRESS, then pipelines.yaml ray.address; else local processes)"),
) -> None:
    """Download the images of a metadata folder with img2dataset into verified webdataset
    shards (image + .txt + .json), under byte/pixel limits, with a ledger of every URL.
    Rerunning skips verified shards and redoes the rest."""
    from curate import download as dl

    flags = dict(image_size=image_size, resize_mode=resize_mode, processes=processes, threads=threads,
                 retry_failed=retry_failed, samples_per_shard=samples_per_shard, timeout=timeout, retries=retries,
                 max_bytes=max_bytes, max_pixels=max_pixels, ray_address=ray_address)
    with user_errors():  # one line: exit 2 for user errors, exit 1 for unfinished shards
        doc = config.load_yaml(config_path)
        flags["ray_address"] = ray_address or config.section(doc, "ray").get("address")
        cfg = config.merge(dl.DownloadConfig, config.section(doc, "curate.download"), flags, where="curate download")
        stats = dl.run(cfg, str(input), str(output))
    ledger.print_counts(stats)
    Console().print(reasons_table(stats.get("failed_reasons", {})))


def reasons_table(reasons: dict[str, int], top: int = 15) -> Table:
    table = Table(title="failed: reasons")
    table.add_column("reason")
    table.add_column("rows", justify="right")
    for reason, n in list(reasons.items())[:top]:
        table.add_row(reason, f"{n:,}")
    return table
