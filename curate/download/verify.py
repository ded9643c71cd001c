"""Shard verification: a shard counts as done only if its three files agree.

img2dataset writes `NNNNN.tar`, `NNNNN.parquet` (one row per input URL) and, last,
`NNNNN_stats.json`. A shard is verified when
  * `_stats.json` exists (img2dataset finished the shard; its exit code proves nothing),
  * the parquet holds exactly the planned rows, once each,
  * the tar reads to its end with no refused member, every sample whole (image, caption,
    json with sha256 and original size), and its keys are exactly the parquet's successes.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow.parquet as pq

from core import imageshard


@dataclass
class ShardCheck:
    name: str  # "00003"
    rows: int = 0  # parquet rows
    kept: int = 0  # samples in the tar
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def shard_name(shard_id: int, digits: int) -> str:
    return f"{shard_id:0{digits}d}"


def shard_files(folder: Path, name: str) -> dict[str, Path]:
    return {k: folder / f"{name}{s}" for k, s in (("tar", ".tar"), ("parquet", ".parquet"), ("stats", "_stats.json"))}


def verify_shard(folder: Path, name: str, expected_rows: int, caption: bool = True) -> ShardCheck:
    """Check shard `name` in `folder` (see module doc); problems are listed, never raised."""
    check = ShardCheck(name)
    files = shard_files(folder, name)
    if not files["stats"].is_file():
        check.problems.append("no _stats.json: img2dataset did not finish this shard")
        return check
    try:
        stats = json.loads(files["stats"].read_text())
        table = pq.read_table(files["parquet"], columns=["key", "status", "source_row"])
    except (OSError, ValueError) as exc:
        check.problems.append(f"unreadable parquet or stats: {exc}")
        return check
    check.rows = table.num_rows
    successes = {k for k, s in zip(table.column("key").to_pylist(), table.column("status").to_pylist()) if s == "success"}
    _check_counts(check, stats, table, expected_rows, len(successes))
    _check_tar(check, files["tar"], successes, caption)
    return check


def _check_counts(check: ShardCheck, stats: dict, table, expected_rows: int, n_success: int) -> None:
    if table.num_rows != expected_rows:
        check.problems.append(f"parquet has {table.num_rows} rows, the plan has {expected_rows}")
    if len(set(table.column("source_row").to_pylist())) != table.num_rows:
        check.problems.append("parquet lists an input row twice")
    if stats.get("count") != expected_rows or stats.get("successes") != n_success:
        check.problems.append(
            f"_stats.json says count={stats.get('count')} successes={stats.get('successes')}, "
            f"parquet has {table.num_rows} rows, {n_success} successes"
        )


def _check_tar(check: ShardCheck, tar: Path, successes: set[str], caption: bool) -> None:
    if not tar.is_file():
        check.problems.append("no tar")
        return
    report = imageshard.ReadReport(str(tar))
    seen: set[str] = set()
    for sample in imageshard.iter_shard(tar, report):
        whole = sample.image is not None and "sha256" in sample.meta and "original_width" in sample.meta
        if not whole or (caption and sample.caption is None):
            check.problems.append(f"sample {sample.key} is incomplete")
        if sample.key in seen:
            check.problems.append(f"sample {sample.key} appears twice")
        seen.add(sample.key)
    check.kept = len(seen)
    if report.damaged:
        check.problems.append(f"tar unreadable to the end: {report.damaged}")
    check.problems += [f"refused member {n}: {why}" for n, why in report.refused + report.bad_members]
    if seen != successes:
        check.problems.append(
            f"tar has {len(seen)} samples, parquet {len(successes)} successes "
            f"({len(seen - successes)} unexpected, {len(successes - seen)} missing)"
        )
