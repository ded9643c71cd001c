"""What the img2dataset worker process is told: one JSON file per call (OUT/_logs/*.spec.json).

    {"i2d": img2dataset.download keyword arguments, "limits": curate.download.limits.Limits,
     "network": {"allow_networks": CIDRs the guard lets through (curate.download.addresses)},
     "plan": the ShardEntry list of this call, "columns": which input columns to carry,
     "ray_address": the Ray cluster for img2dataset's Ray distributor, or null}
With `distributor: auto`, img2dataset runs its Ray distributor when this process joined a Ray
cluster (the one rule of core.cli.ray_address: --ray-address > RAY_ADDRESS > pipelines.yaml),
else local processes; `ray` runs it on whatever Ray this process uses (a local one is started).
"""
from __future__ import annotations

import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

from core.ray_util import joined_address
from curate.download.plan import SOURCE_COLUMNS, ShardEntry, ShardPlan


def i2d_kwargs(cfg: Any, staging: Path, columns: dict[str, Any], plan: ShardPlan, first: str,
               ray_address: str | None) -> dict[str, Any]:
    """Arguments of `img2dataset.download` (X-Robots-Tag handling left at its default: on)."""
    return {
        "url_list": first,
        "input_format": "parquet",
        "url_col": cfg.url_col,
        "caption_col": cfg.caption_col,
        "save_additional_columns": list(columns["extra"]) + list(SOURCE_COLUMNS),
        "output_folder": str(staging),
        "output_format": "webdataset",
        "image_size": cfg.image_size,
        "resize_mode": cfg.resize_mode,
        "resize_only_if_bigger": cfg.resize_only_if_bigger,
        "encode_format": cfg.encode_format,
        "encode_quality": cfg.encode_quality,
        "min_image_size": cfg.min_image_size,
        "max_aspect_ratio": cfg.max_aspect_ratio,
        "processes_count": cfg.processes or os.cpu_count() or 1,
        "thread_count": cfg.threads,
        "number_sample_per_shard": cfg.samples_per_shard,
        "oom_shard_count": plan.digits,
        "timeout": cfg.timeout,
        "retries": cfg.retries,
        "compute_hash": "sha256",
        "extract_exif": False,
        "user_agent_token": cfg.user_agent_token,
        "distributor": "ray" if ray_address else "multiprocessing",
        "enable_wandb": False,
    }


def distributor_address(distributor: str) -> str | None:
    """The Ray address img2dataset's workers join, or None for local processes."""
    if distributor == "multiprocessing":
        return None
    if distributor == "auto":
        return joined_address()
    from core.ray_util import init_ray

    init_ray()
    import ray

    return ray.get_runtime_context().gcs_address


def worker_spec(cfg: Any, staging: Path, columns: dict[str, Any], plan: ShardPlan,
                entries: list[ShardEntry]) -> dict[str, Any]:
    address = distributor_address(cfg.distributor)
    limits = {
        "max_bytes": cfg.max_bytes,
        "max_pixels": cfg.max_pixels,
        "max_aspect_ratio": cfg.max_aspect_ratio,
        "max_seconds": cfg.max_download_seconds,
    }
    # img2dataset lists its `url_list` but never reads it here (PlannedReader yields the plan's
    # rows, reading local or object-store inputs itself): a local name keeps it off fsspec's s3.
    placeholder = str(staging / "_input_read_by_plan.parquet")
    return {"i2d": i2d_kwargs(cfg, staging, columns, plan, placeholder, address), "limits": limits,
            "network": {"allow_networks": list(cfg.allow_networks)},
            "plan": [asdict(e) for e in entries], "columns": columns, "ray_address": address}
