"""`curate download`: img2dataset into verified webdataset shards, with full accounting.

Input: the parquet folder a previous curate step wrote (the parts its `_stats.json` names,
else `IN/*.parquet` with `_` names skipped) or one file. Output folder OUT:
    NNNNN.tar, NNNNN.parquet, NNNNN_stats.json   img2dataset's webdataset shards (verified)
    _plan.json        the shard plan (curate.download.plan)
    _done/NNNNN.json  completion marker of a verified shard (sizes, counts, the files it commits)
    _ledger/NNNNN.parquet  one part per original shard: every input row kept or failed
    _retry/NNNNN.parquet   inputs of retry shards (`--retry-failed`); _retry/_select/: the
                      transient failures of each original shard, with their input rows
    _logs/            img2dataset's output and spec per call; _stats.json: the reconciled counts
                      and the shards ("parts")
Input and output may be local paths or object-store URIs (s3://, gs://; core.storage).
img2dataset always writes to a LOCAL staging folder (`staging`: OUT/_staging for a local OUT,
else a folder under the system's temp directory): the fast local disk it expects.

A run plans the shards once, adopts what earlier attempts left verified in staging, and runs
img2dataset once (in `curate.download.worker`, a subprocess under `curate.download.watchdog`)
over the shards without a marker; each shard is verified and adopted as soon as img2dataset
finishes it (`curate.download.adopt`: committed to OUT by a rename or an upload, then its
ledger, then its marker). A shard that fails verification is left unmarked and the step ends
incomplete: rerun to redo exactly those.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from core import atomic, laion, ledger, rundir, storage
from core.config import ConfigError, execution
from core.errors import StepIncomplete
from core.ray_util import joined_address
from core.rundir import RunDir, hold_lock
from core.storage import AnyPath
from core.units import Unit, run_units
from curate.download import adopt, retry
from curate.download.addresses import parse_networks
from curate.download import ledger as download_ledger
from curate.download.plan import SOURCE_COLUMNS, ShardEntry, ShardPlan, add_retry_shards, make_plan
from curate.download.spec import distributor_address, worker_spec
from curate.download.verify import ShardCheck
from curate.download.watchdog import supervise
from curate.steps import Step

RESIZE_MODES = ("center_crop", "keep_ratio", "keep_ratio_largest", "border", "no")
ENCODE_FORMATS = ("jpg", "png", "webp")
DISTRIBUTORS = ("auto", "ray", "multiprocessing")


class DownloadIncomplete(StepIncomplete):
    """Some shards did not finish or failed verification; a rerun redoes exactly those."""


@dataclass
class DownloadConfig:
    """Settings of `curate download` (section `curate.download` of pipelines.yaml)."""

    # Stored size: with keep_ratio, the SHORTER side in pixels (img2dataset image_size). Download
    # at the largest resolution you will train at: pretokenize crops res x res from it and never
    # upscales (stage 1: 256, stage 2: 512, stage 3: 1024; a 1024 download serves all three).
    image_size: int = 512
    # keep_ratio keeps the whole picture and its aspect ratio, so pretokenize can derive the
    # micro-conditions (original size, crop offsets) from the original; center_crop | border |
    # keep_ratio_largest | no are img2dataset's other modes (RESIZE_MODES).
    resize_mode: str = "keep_ratio"
    resize_only_if_bigger: bool = True  # never upscale: a small image is stored at its own size
    encode_format: str = "jpg"  # image format stored in the tars: jpg | png | webp
    encode_quality: int = 95  # jpg/webp quality 0-100, png compression 0-9
    url_col: str = "URL"  # input column holding the image URL
    caption_col: str = "TEXT"  # input column holding the caption (-> .txt)
    # Input columns copied into each sample's .json and the shard parquet, when present, found
    # by core.laion.stored_name (so `aesthetic` also finds AESTHETIC_SCORE). `hash` (LAION's
    # row id) is computed when the input lacks it.
    metadata_columns: list[str] = field(
        default_factory=lambda: ["hash", "aesthetic", "pwatermark", "punsafe", "similarity", "long_caption"]
    )
    samples_per_shard: int = 10000  # input rows per shard (img2dataset number_sample_per_shard)
    processes: int | None = execution(None)  # local worker processes (None: all CPUs); Ray ignores it
    threads: int = execution(64)  # download threads per process
    timeout: float = execution(10.0)  # seconds one blocking call may stall (connect, TLS, a read) before failing
    # Seconds one URL may take in all: DNS, connect, TLS, headers, every redirect, the body and
    # its retries; past it the URL fails `timeout`, however slow the server.
    max_download_seconds: float = execution(60.0)
    stall_seconds: float = execution(900.0)  # no shard file changed this long: stop img2dataset (a hung pool)
    retries: int = execution(2)  # immediate retries of a transient failure (timeouts, 429, 5xx, resets)
    max_bytes: int = 64 * 1024 * 1024  # largest body accepted; more -> failed too_large
    max_pixels: int = 100_000_000  # largest width*height (from the header) decoded
    max_aspect_ratio: float = 10.0  # long/short side; beyond it a resize would explode
    min_image_size: int = 0  # smaller short side -> failed too_small
    user_agent_token: str = "tessera"  # named in the User-Agent and matched in X-Robots-Tag
    # CIDRs the network guard lets through (curate.download.addresses), e.g. ["127.0.0.0/8"] for a
    # loopback server; by default loopback, private, link-local, CGNAT, multicast, reserved and
    # cloud-metadata addresses are refused (blocked_address). Part of the folder's identity: it
    # decides which URLs are fetched, so what the shards hold.
    allow_networks: list[str] = field(default_factory=list)
    # img2dataset's distributor: auto = its Ray distributor when the command joined a Ray cluster
    # (--ray-address, RAY_ADDRESS, ray.address), else local processes; ray | multiprocessing to choose.
    distributor: str = execution("auto")
    retry_failed: bool = execution(False)  # after the run, re-queue transient failures into new shards
    # Local folder img2dataset writes into before each shard is verified and committed to the
    # output (null: OUT/_staging for a local output, else <temp dir>/tessera-download/<output's
    # digest>). Keep it on the same machine between a run and its rerun to adopt finished shards.
    staging: str | None = execution(None)
    allow_incomplete: bool = execution(False)  # use an unfinished upstream folder (no _stats.json) as it is

    def __post_init__(self) -> None:
        if self.resize_mode not in RESIZE_MODES:
            raise ValueError(f"resize_mode must be one of {', '.join(RESIZE_MODES)}, got {self.resize_mode!r}")
        if self.distributor not in DISTRIBUTORS:
            raise ValueError(f"distributor must be one of {', '.join(DISTRIBUTORS)}, got {self.distributor!r}")
        if self.encode_format not in ENCODE_FORMATS:
            raise ValueError(f"encode_format must be one of {', '.join(ENCODE_FORMATS)}, got {self.encode_format!r}")
        positive = ("image_size", "samples_per_shard", "threads", "timeout", "max_download_seconds", "stall_seconds",
                    "max_bytes", "max_pixels")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.processes is not None and self.processes <= 0:
            raise ValueError(f"processes must be > 0 (or null for all CPUs), got {self.processes}")
        if self.retries < 0 or self.min_image_size < 0:
            raise ValueError("retries and min_image_size must be >= 0")
        if self.max_aspect_ratio < 1:
            raise ValueError(f"max_aspect_ratio must be >= 1, got {self.max_aspect_ratio}")
        self.allow_networks = [str(n) for n in parse_networks(self.allow_networks)]  # one spelling per network
        if not self.user_agent_token.strip():
            raise ValueError("user_agent_token must name this crawler (site owners opt out by it)")
        clash = set(self.metadata_columns) & {"url", "caption", "key", "status", "error_message", "sha256", *SOURCE_COLUMNS}
        if clash:
            raise ValueError(f"metadata_columns may not include img2dataset's own columns: {sorted(clash)}")


# ---------------------------------------------------------------- inputs and plan


def list_inputs(inp: str | os.PathLike) -> list[AnyPath]:
    """The input parquet files: the parts a step's folder names in its records, a folder's
    `*.parquet` (skipping `_` names), or one file; local or on an object store."""
    p = storage.path(inp)
    if p.is_file():
        return [p]
    files = rundir.recorded_files(p, ".parquet") if p.is_dir() else []
    if files is None:
        files = sorted((x for x in p.glob("*.parquet") if not x.name.startswith("_")), key=str)
    if not files:
        raise ConfigError(f"{inp}: no input parquet files (expected the output folder of a curate step)")
    return files


def input_columns(cfg: DownloadConfig, files: list[AnyPath]) -> dict[str, Any]:
    """Which metadata columns to carry, checked against every input file's schema."""
    names = []
    for f in files:
        with storage.parquet_file(f) as pf:
            names.append(set(pf.schema_arrow.names))
    for f, cols in zip(files, names):
        missing = [c for c in (cfg.url_col, cfg.caption_col) if c not in cols]
        if missing:
            raise ConfigError(f"{f}: no column {missing[0]!r} (set url_col / caption_col in curate.download)")
    common = set.intersection(*names)
    stored = [laion.stored_name(common, c) for c in cfg.metadata_columns]
    extra = list(dict.fromkeys(s for s in stored if s is not None))
    extra += ["hash"] if "hash" in cfg.metadata_columns and "hash" not in extra else []
    return {"url": cfg.url_col, "caption": cfg.caption_col, "extra": extra, "compute_hash": "hash" not in common}


def load_plan(rd: RunDir, cfg: DownloadConfig, files: list[AnyPath]) -> ShardPlan:
    path = rd.path / "_plan.json"
    if path.is_file():
        return ShardPlan.load(path)
    plan = make_plan(files, cfg.samples_per_shard)
    plan.save(path)
    return plan


def staging_root(cfg: DownloadConfig, rd: RunDir) -> Path:
    """The local folder img2dataset's attempts write into (see DownloadConfig.staging)."""
    if cfg.staging:
        return Path(cfg.staging).absolute()
    if isinstance(rd.path, Path):
        return rd.path / adopt.STAGING
    digest = hashlib.sha256(str(rd.path).encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / "tessera-download" / digest


def check_staging(cfg: DownloadConfig, rd: RunDir) -> None:
    """img2dataset's Ray workers write into the staging folder: with an output in a bucket and
    a cluster of several nodes, a default (node-local) staging folder would never show the
    driver the other nodes' shards."""
    if cfg.staging or isinstance(rd.path, Path) or distributor_address(cfg.distributor) is None:
        return
    import ray

    if sum(1 for n in ray.nodes() if n.get("Alive")) > 1:
        raise ConfigError(f"{rd.path}: img2dataset's Ray workers on {len(ray.nodes())} nodes write into the staging "
                          "folder: pass --staging with a folder every node sees (a shared filesystem), or set "
                          "distributor: multiprocessing to download from this machine only")


# ---------------------------------------------------------------- one img2dataset call


def download_batch(rd: RunDir, cfg: DownloadConfig, columns: dict, plan: ShardPlan,
                   entries: list[ShardEntry]) -> list[ShardCheck]:
    """One img2dataset call over `entries`, each shard adopted as it finishes; returns the
    checks of the shards that did not end verified."""
    attempt = f"{datetime.now(timezone.utc):%Y%m%dT%H%M%S%f}-{os.getpid()}"
    staging = staging_root(cfg, rd) / attempt
    staging.mkdir(parents=True)
    caption = bool(cfg.caption_col)

    def poll() -> int:
        adopt.adopt_finished(rd, plan, entries, staging, caption)
        return sum(rd.is_done(plan.name(e.id)) for e in entries)

    rc = run_worker(rd, worker_spec(cfg, staging, columns, plan, entries), staging, poll, len(entries), cfg.stall_seconds)
    failed = adopt.adopt_finished(rd, plan, entries, staging, caption, final=True)
    if rc != 0:
        for c in failed:
            c.problems.append(f"img2dataset worker exited with code {rc} (see {rd.path / '_logs'})")
    shutil.rmtree(staging, ignore_errors=True)
    return failed


def run_worker(rd: RunDir, spec: dict[str, Any], staging: Path, poll: Any, total: int, stall_seconds: float) -> int:
    """Run img2dataset in `curate.download.worker` under the watchdog. Its spec and log are
    written beside the staging attempt (the worker reads a local file) and kept in OUT/_logs."""
    stamp = f"img2dataset-{staging.name}"
    spec_path, log = staging.parent / f"{stamp}.spec.json", staging.parent / f"{stamp}.log"
    atomic.write_json(spec_path, spec)
    env = dict(os.environ, OPENCV_IO_MAX_IMAGE_PIXELS=str(spec["limits"]["max_pixels"]), PYTHONUNBUFFERED="1",
               NO_ALBUMENTATIONS_UPDATE="1", HF_HUB_OFFLINE="1", WANDB_MODE="disabled")
    cmd = [sys.executable, "-m", "curate.download.worker", str(spec_path)]
    try:
        return supervise(cmd, env, log, staging, poll, total, stall_seconds, lock_fd=hold_lock(rd.path))
    finally:
        for local in (spec_path, log):
            if local.is_file():
                atomic.publish(local, rd.path / "_logs" / local.name)


# ---------------------------------------------------------------- retry of transient failures


def plan_retries(rd: RunDir, cfg: DownloadConfig, columns: dict, plan: ShardPlan) -> list[ShardEntry]:
    """Re-queue the transient failures as new shards after the last one; returns them. Each
    original shard's failures are joined with its shards' parquets in a task of their own
    (`retry.select_unit`: one shard's keys at a time, as Arrow); the retry shards are then cut
    from those parts as a stream, one shard's rows in memory at a time."""
    originals = plan.originals()
    select = rd.path / retry.SELECT_DIR
    children = plan.children()
    units = [Unit(f"retry.{plan.name(e.id)}",
                  (str(rd.path / ledger.LEDGER_DIR / f"{plan.name(e.id)}.parquet"),
                   [str(rd.path / f"{plan.name(s)}.parquet") for s in (e.id, *children.get(e.id, []))],
                   plan.key_digits, columns, str(select / f"{plan.name(e.id)}.parquet")),
                  input=rundir.file_identity(rd.path / ledger.LEDGER_DIR / f"{plan.name(e.id)}.parquet"))
             for e in originals]
    infos = run_units(rd, units, retry.select_unit, "download: selecting transient failures",
                      executor="ray" if joined_address() else "local")
    parts = [str(select / f"{plan.name(e.id)}.parquet") for e, i in zip(originals, infos) if i["rows"]]
    new = add_retry_shards(plan, retry.read_parts(parts), cfg.samples_per_shard, rd.path / "_retry")
    if new:
        plan.save(rd.path / "_plan.json")
    for u in units:  # the next --retry-failed selects again from the ledger it will leave
        rd.marker(u.name).unlink(missing_ok=True)
    storage.rmtree(select)
    return new


# ---------------------------------------------------------------- the step


def run(cfg: DownloadConfig, inp: str, out: str) -> dict[str, Any]:
    """Download every input row into verified shards; returns the reconciled stats.

    Raises DownloadIncomplete (after doing all it could) when shards remain unfinished."""
    rundir.check_finished(inp, cfg.allow_incomplete)
    files = list_inputs(inp)
    columns = input_columns(cfg, files)
    rd = RunDir.open(out, "download", rundir.identity(cfg, rundir.fingerprint(inp, files)), inputs=[inp])
    check_staging(cfg, rd)
    plan = load_plan(rd, cfg, files)
    adopt.adopt_leftovers(rd, plan, bool(cfg.caption_col), staging_root(cfg, rd))
    adopt.rebuild_missing_ledgers(rd, plan)
    todo = adopt.pending(rd, plan)
    if todo:
        rd.unfinish()
    failed = download_batch(rd, cfg, columns, plan, todo) if todo else []
    if cfg.retry_failed and not failed:
        new = plan_retries(rd, cfg, columns, plan)
        if new:
            rd.unfinish()
        failed = download_batch(rd, cfg, columns, plan, new) if new else []
    if failed:
        raise DownloadIncomplete(incomplete_message(rd, failed))
    return write_stats(rd, plan)


def write_stats(rd: RunDir, plan: ShardPlan) -> dict[str, Any]:
    """The completion record: reconciled counts, and the shards it commits ("parts")."""
    originals = plan.originals()
    return ledger.write_stats(
        rd.path,
        "download",
        sum(e.rows for e in originals),
        ledger.counts(rd.path),
        shards=len(originals),
        retry_shards=len(plan.shards) - len(originals),
        failed_reasons=download_ledger.failed_reasons(rd.path),
        parts=[f"{plan.name(e.id)}.tar" for e in plan.shards],
    )


def incomplete_message(rd: RunDir, failed: list[ShardCheck]) -> str:
    lines = [f"{len(failed)} shard(s) did not finish or failed verification; rerun the same command to redo them:"]
    lines += [f"  {c.name}: {'; '.join(c.problems)}" for c in failed[:10]]
    return "\n".join(lines) + f"\n(img2dataset logs: {rd.path / '_logs'})"


STEP = Step("download", DownloadConfig, run)
