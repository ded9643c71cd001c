"""`curate download`: img2dataset into verified webdataset shards, with full accounting.

Input: the parquet folder a previous curate step wrote (`IN/*.parquet`, `_` names skipped).
Output folder OUT:
    NNNNN.tar, NNNNN.parquet, NNNNN_stats.json   img2dataset's webdataset shards (verified)
    _plan.json        shard plan: rows [start, stop) of an input file per shard, then retry shards
    _done/NNNNN.json  completion marker of a verified shard (sizes, counts)
    _ledger/NNNNN.parquet  one part per original shard: every input row kept or failed
    _retry/NNNNN.parquet   inputs of retry shards (`--retry-failed`)
    _logs/            img2dataset's output per call; _stats.json: the reconciled counts

A run plans the shards once, runs img2dataset (in `curate.download_worker`, a subprocess:
see its doc) on the shards without a marker, verifies each shard it wrote
(`curate.download_verify`), moves verified shards to the top level, rebuilds their ledger
parts and marks them done. A shard that fails verification is left unmarked: rerun to redo it.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from core import atomic, ledger
from core.config import ConfigError, to_dict
from core.progress import make_progress
from curate.steps import StepIncomplete
from core.rundir import RunDir
from curate import download_ledger
from curate.download_engine import SOURCE_COLUMNS
from curate.download_verify import ShardCheck, shard_files, shard_name, verify_shard
from curate.steps import Step

RESIZE_MODES = ("center_crop", "keep_ratio", "keep_ratio_largest", "border", "no")
ENCODE_FORMATS = ("jpg", "png", "webp")
# Settings that change how fast or how hard we try, not what a shard contains: left out of
# the run folder's config hash, so a rerun may change them.
EXECUTION_FIELDS = ("processes", "threads", "timeout", "max_download_seconds", "stall_seconds", "retries",
                    "ray_address", "retry_failed")


class DownloadIncomplete(StepIncomplete):
    """Some shards did not finish or failed verification; a rerun redoes exactly those."""


@dataclass
class DownloadConfig:
    """Settings of `curate download` (section `curate.download` of pipelines.yaml)."""

    image_size: int = 512  # output side in pixels (img2dataset image_size)
    resize_mode: str = "center_crop"  # one of RESIZE_MODES (img2dataset resize_mode)
    resize_only_if_bigger: bool = False  # never upscale small images
    encode_format: str = "jpg"  # image format stored in the tars: jpg | png | webp
    encode_quality: int = 95  # jpg/webp quality 0-100, png compression 0-9
    url_col: str = "URL"  # input column holding the image URL
    caption_col: str = "TEXT"  # input column holding the caption (-> .txt)
    # Input columns copied into each sample's .json and the shard parquet, when present.
    # `hash` (LAION's mmh3 of URL+TEXT) is computed when the input lacks it.
    metadata_columns: list[str] = field(
        default_factory=lambda: ["hash", "aesthetic", "AESTHETIC_SCORE", "pwatermark", "punsafe", "similarity", "long_caption"]
    )
    samples_per_shard: int = 10000  # input rows per shard (img2dataset number_sample_per_shard)
    processes: int | None = None  # local worker processes (None: all CPUs); Ray ignores it
    threads: int = 64  # download threads per process
    timeout: float = 10.0  # seconds a socket may stall (connect or read) before failing
    max_download_seconds: float = 60.0  # total seconds for one body: stops slow trickles
    stall_seconds: float = 900.0  # no shard file changed this long: stop img2dataset (a hung pool)
    retries: int = 2  # immediate retries of a transient failure (timeouts, 429, 5xx, resets)
    max_bytes: int = 64 * 1024 * 1024  # largest body accepted; more -> failed too_large
    max_pixels: int = 100_000_000  # largest width*height (from the header) decoded
    max_aspect_ratio: float = 10.0  # long/short side; beyond it a resize would explode
    min_image_size: int = 0  # smaller short side -> failed too_small
    user_agent_token: str = "tessera"  # named in the User-Agent and matched in X-Robots-Tag
    ray_address: str | None = None  # Ray cluster for img2dataset's Ray distributor ("local": a fresh local Ray)
    retry_failed: bool = False  # after the run, re-queue transient failures into new shards

    def __post_init__(self) -> None:
        if self.resize_mode not in RESIZE_MODES:
            raise ValueError(f"resize_mode must be one of {', '.join(RESIZE_MODES)}, got {self.resize_mode!r}")
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
        if not self.user_agent_token.strip():
            raise ValueError("user_agent_token must name this crawler (site owners opt out by it)")
        clash = set(self.metadata_columns) & {"url", "caption", "key", "status", "error_message", "sha256", *SOURCE_COLUMNS}
        if clash:
            raise ValueError(f"metadata_columns may not include img2dataset's own columns: {sorted(clash)}")


# ---------------------------------------------------------------- inputs and plan


def list_inputs(inp: str | os.PathLike) -> list[Path]:
    """The input parquet files: a folder's `*.parquet` (skipping `_` names) or one file."""
    p = Path(inp)
    files = [p] if p.is_file() else sorted(x for x in p.glob("*.parquet") if not x.name.startswith("_"))
    if not files:
        raise ConfigError(f"{inp}: no input parquet files (expected the output folder of a curate step)")
    return files


def input_columns(cfg: DownloadConfig, files: list[Path]) -> dict[str, Any]:
    """Which metadata columns to carry, checked against every input file's schema."""
    names = [set(pq.read_schema(f).names) for f in files]
    for f, cols in zip(files, names):
        missing = [c for c in (cfg.url_col, cfg.caption_col) if c not in cols]
        if missing:
            raise ConfigError(f"{f}: no column {missing[0]!r} (set url_col / caption_col in curate.download)")
    common = set.intersection(*names)
    extra = [c for c in cfg.metadata_columns if c in common or c == "hash"]
    return {"url": cfg.url_col, "caption": cfg.caption_col, "extra": extra, "compute_hash": "hash" not in common}


def make_plan(cfg: DownloadConfig, files: list[Path]) -> dict[str, Any]:
    """Cut every input file into shards of `samples_per_shard` rows, numbered from 0."""
    shards = []
    for f in files:
        n = pq.ParquetFile(f).metadata.num_rows
        for start in range(0, n, cfg.samples_per_shard):
            stop = min(n, start + cfg.samples_per_shard)
            shards.append({"id": len(shards), "file": str(f.resolve()), "source": f.name, "start": start, "stop": stop})
    return {
        "version": 1,
        "digits": max(5, len(str(len(shards))) + 1),  # room for retry shards after the originals
        "key_digits": math.ceil(math.log10(cfg.samples_per_shard)),  # as img2dataset computes it
        "shards": shards,
    }


def identity(cfg: DownloadConfig, inp: str | os.PathLike, files: list[Path]) -> dict[str, Any]:
    """What determines the output: the settings (not EXECUTION_FIELDS) and the inputs' rows."""
    settings = {k: v for k, v in to_dict(cfg).items() if k not in EXECUTION_FIELDS}
    rows = {f.name: pq.ParquetFile(f).metadata.num_rows for f in files}
    return {"input": str(Path(inp).resolve()), "input_rows": rows, "settings": settings}


def load_plan(rd: RunDir, cfg: DownloadConfig, files: list[Path]) -> dict[str, Any]:
    path = rd.path / "_plan.json"
    if path.is_file():
        return json.loads(path.read_text())
    plan = make_plan(cfg, files)
    atomic.write_json(path, plan)
    return plan


# ---------------------------------------------------------------- one img2dataset call


def i2d_kwargs(cfg: DownloadConfig, staging: Path, columns: dict[str, Any], plan: dict[str, Any], first: str) -> dict:
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
        "oom_shard_count": plan["digits"],
        "timeout": cfg.timeout,
        "retries": cfg.retries,
        "compute_hash": "sha256",
        "extract_exif": False,
        "user_agent_token": cfg.user_agent_token,
        "distributor": "ray" if ray_address(cfg) else "multiprocessing",
        "enable_wandb": False,
    }


def ray_address(cfg: DownloadConfig) -> str | None:
    """--ray-address / config, else RAY_ADDRESS, else the cluster this process already joined
    if it has several nodes (`curate run --ray-address ...`); None: local processes."""
    address = cfg.ray_address or os.environ.get("RAY_ADDRESS")
    if address:
        return address
    ray = sys.modules.get("ray")  # never imported: never joined
    if ray is not None and ray.is_initialized() and len([n for n in ray.nodes() if n.get("Alive")]) > 1:
        return ray.get_runtime_context().gcs_address
    return None


def worker_spec(cfg: DownloadConfig, staging: Path, columns: dict, plan: dict, entries: list[dict]) -> dict:
    limits = {
        "max_bytes": cfg.max_bytes,
        "max_pixels": cfg.max_pixels,
        "max_aspect_ratio": cfg.max_aspect_ratio,
        "max_seconds": cfg.max_download_seconds,
    }
    kwargs = i2d_kwargs(cfg, staging, columns, plan, entries[0]["file"])
    return {"i2d": kwargs, "limits": limits, "plan": entries, "columns": columns, "ray_address": ray_address(cfg),
            "stall_seconds": cfg.stall_seconds}


def run_worker(rd: RunDir, spec: dict[str, Any], staging: Path, n_shards: int) -> int:
    """Run img2dataset in `curate.download_worker`, a bar advancing per finished shard."""
    logs = rd.path / "_logs"
    logs.mkdir(exist_ok=True)
    stamp = f"img2dataset-{datetime.now(timezone.utc):%Y%m%dT%H%M%S%f}"
    spec_path, log = logs / f"{stamp}.spec.json", logs / f"{stamp}.log"
    atomic.write_json(spec_path, spec)
    env = dict(os.environ, OPENCV_IO_MAX_IMAGE_PIXELS=str(spec["limits"]["max_pixels"]), PYTHONUNBUFFERED="1",
               NO_ALBUMENTATIONS_UPDATE="1", HF_HUB_OFFLINE="1", WANDB_MODE="disabled")
    cmd = [sys.executable, "-m", "curate.download_worker", str(spec_path)]
    return supervise(cmd, env, log, staging, n_shards, spec["stall_seconds"])


def supervise(cmd: list[str], env: dict, log: Path, staging: Path, n_shards: int, stall_seconds: float) -> int:
    """Run `cmd` in its own process group, a bar advancing per `_stats.json` in `staging`.

    A multiprocessing pool whose worker is killed (OOM killer, a crash in a codec) waits
    forever for the lost shard: when no file under `staging` has changed for `stall_seconds`
    the whole group is stopped, and the unfinished shards are left for a rerun."""
    with open(log, "wb") as out, make_progress() as progress:
        bar = progress.add_task("download shards", total=n_shards)
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        last_change = time.time()  # wall clock, as file mtimes are
        try:
            while proc.poll() is None:
                time.sleep(0.5)
                last_change = max(last_change, latest_change(staging))
                progress.update(bar, completed=len(list(staging.glob("*_stats.json"))))
                if time.time() - last_change > stall_seconds:
                    out.write(f"\ncurate download: no progress for {stall_seconds:g} s, stopped\n".encode())
                    break
        finally:
            stop_group(proc)
        progress.update(bar, completed=len(list(staging.glob("*_stats.json"))))
    return proc.returncode


def latest_change(folder: Path) -> float:
    """Newest mtime (wall clock) of the shard files being written in `folder`, 0 when none."""
    times = []
    for p in folder.glob("*"):
        try:
            times.append(p.stat().st_mtime)
        except FileNotFoundError:  # renamed or removed between listing and stat
            pass
    return max(times, default=0.0)


def stop_group(proc: subprocess.Popen) -> None:
    """Stop the worker and the pool it spawned (its process group), if still running."""
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def download_batch(rd: RunDir, cfg: DownloadConfig, columns: dict, plan: dict, entries: list[dict]) -> list[ShardCheck]:
    """One img2dataset call over `entries`; returns the checks of the shards that failed."""
    staging = rd.path / "_staging"
    shutil.rmtree(staging, ignore_errors=True)  # a killed run's partial shards are never reused
    staging.mkdir()
    rc = run_worker(rd, worker_spec(cfg, staging, columns, plan, entries), staging, len(entries))
    children = retry_children(plan)
    failed = [c for c in (finish_shard(rd, plan, e, staging, cfg, children) for e in entries) if not c.ok]
    if rc != 0:
        for c in failed:
            c.problems.append(f"img2dataset worker exited with code {rc} (see {rd.path / '_logs'})")
    shutil.rmtree(staging, ignore_errors=True)
    return failed


# ---------------------------------------------------------------- verify, promote, account


def finish_shard(rd: RunDir, plan: dict, entry: dict, staging: Path, cfg: DownloadConfig,
                 children: dict[int, list[int]] | None = None) -> ShardCheck:
    """Verify a staged shard; if good move it to the top level, rebuild ledgers, mark done."""
    name = shard_name(entry["id"], plan["digits"])
    check = verify_shard(staging, name, entry["stop"] - entry["start"], caption=bool(cfg.caption_col))
    if not check.ok:
        return check
    for src in shard_files(staging, name).values():
        os.replace(src, rd.path / src.name)  # same filesystem: atomic per file
    children = retry_children(plan) if children is None else children
    for origin in entry.get("retry_of") or [entry["id"]]:
        write_ledger_part(rd, plan, origin, children.get(origin, []), extra_done={entry["id"]})
    files = shard_files(rd.path, name)
    rd.mark_done(name, {"rows": check.rows, "kept": check.kept, "retry_of": entry.get("retry_of"),
                        **{f"{k}_bytes": p.stat().st_size for k, p in files.items()}})
    return check


def retry_children(plan: dict) -> dict[int, list[int]]:
    """original shard id -> ids of the retry shards holding some of its rows, in order."""
    out: dict[int, list[int]] = {}
    for e in plan["shards"]:
        for origin in e.get("retry_of") or ():
            out.setdefault(origin, []).append(e["id"])
    return out


def write_ledger_part(rd: RunDir, plan: dict, shard_id: int, children: list[int], extra_done: set[int] = frozenset()) -> None:
    """Rebuild the ledger part of original shard `shard_id` from its parquet and its finished retries."""
    entry = plan["shards"][shard_id]
    digits = plan["digits"]
    retries = [
        rd.path / f"{shard_name(c, digits)}.parquet"
        for c in children
        if c in extra_done or rd.is_done(shard_name(c, digits))
    ]
    own = rd.path / f"{shard_name(shard_id, digits)}.parquet"
    ledger.write(rd.path, shard_name(shard_id, digits), download_ledger.build_part(entry, own, retries))


def still_valid(rd: RunDir, name: str) -> bool:
    """A done shard whose files vanished or changed size since verification is redone."""
    info = rd.done_info(name)
    files = shard_files(rd.path, name)
    return all(p.is_file() and p.stat().st_size == info.get(f"{k}_bytes") for k, p in files.items())


def pending(rd: RunDir, plan: dict) -> list[dict]:
    out = []
    for e in plan["shards"]:
        name = shard_name(e["id"], plan["digits"])
        if rd.is_done(name) and not still_valid(rd, name):
            rd.marker(name).unlink()
        if not rd.is_done(name):
            out.append(e)
    return out


# ---------------------------------------------------------------- retry of transient failures


def plan_retries(rd: RunDir, cfg: DownloadConfig, columns: dict, plan: dict) -> list[dict]:
    """Write the transient failures' input rows as new shards after the last one; returns them."""
    keys = download_ledger.transient_keys(rd.path)
    if not keys:
        return []
    table = retry_rows(rd, cfg, columns, plan, keys)
    new = []
    for start in range(0, table.num_rows, cfg.samples_per_shard):
        part = table.slice(start, cfg.samples_per_shard)
        sid = len(plan["shards"]) + len(new)
        path = rd.path / "_retry" / f"{shard_name(sid, plan['digits'])}.parquet"
        atomic.write_parquet(path, part)
        origins = sorted(set(part.column("source_shard").to_pylist()))
        new.append({"id": sid, "file": str(path), "start": 0, "stop": part.num_rows, "retry_of": origins})
    plan["shards"].extend(new)
    atomic.write_json(rd.path / "_plan.json", plan)
    return new


def retry_rows(rd: RunDir, cfg: DownloadConfig, columns: dict, plan: dict, keys: list[str]) -> pa.Table:
    """The full input rows (original column names) of the samples `keys`, from their shard parquets."""
    by_shard: dict[int, set[str]] = {}
    for k in keys:
        by_shard.setdefault(int(k) // 10 ** plan["key_digits"], set()).add(k)
    wanted = ["url", "caption", *columns["extra"], *SOURCE_COLUMNS]
    parts = []
    for sid, ks in sorted(by_shard.items()):
        t = pq.read_table(rd.path / f"{shard_name(sid, plan['digits'])}.parquet", columns=wanted + ["key"])
        mask = pa.array([k in ks for k in t.column("key").to_pylist()])
        parts.append(t.filter(mask).select(wanted))
    table = pa.concat_tables(parts)
    names = {"url": cfg.url_col, "caption": cfg.caption_col}
    return table.rename_columns([names.get(c, c) for c in table.column_names])


# ---------------------------------------------------------------- the step


def run(cfg: DownloadConfig, inp: str, out: str) -> dict[str, Any]:
    """Download every input row into verified shards; returns the reconciled stats.

    Raises DownloadIncomplete (after doing all it could) when shards remain unfinished."""
    files = list_inputs(inp)
    columns = input_columns(cfg, files)
    rd = RunDir.open(out, "download", identity(cfg, inp, files))
    with exclusive(rd.path):
        plan = load_plan(rd, cfg, files)
        failed = run_pending(rd, cfg, columns, plan)
        if cfg.retry_failed and not failed:
            new = plan_retries(rd, cfg, columns, plan)
            failed = download_batch(rd, cfg, columns, plan, new) if new else []
        if failed:
            raise DownloadIncomplete(incomplete_message(rd, failed))
        return write_stats(rd, plan)


@contextlib.contextmanager
def exclusive(folder: Path) -> Iterator[None]:
    """One run per output folder: a second one would clear the first one's staging area."""
    with open(folder / "_lock", "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ConfigError(f"{folder}: another curate download is running on this folder") from None
        yield


def run_pending(rd: RunDir, cfg: DownloadConfig, columns: dict, plan: dict) -> list[ShardCheck]:
    todo = pending(rd, plan)
    children = retry_children(plan)
    for e in plan["shards"]:  # a ledger part lost after its shard was done is rebuilt
        name = shard_name(e["id"], plan["digits"])
        if "retry_of" not in e and rd.is_done(name) and not (rd.path / ledger.LEDGER_DIR / f"{name}.parquet").is_file():
            write_ledger_part(rd, plan, e["id"], children.get(e["id"], []))
    return download_batch(rd, cfg, columns, plan, todo) if todo else []


def write_stats(rd: RunDir, plan: dict) -> dict[str, Any]:
    originals = [e for e in plan["shards"] if "retry_of" not in e]
    rows_in = sum(e["stop"] - e["start"] for e in originals)
    return ledger.write_stats(
        rd.path,
        "download",
        rows_in,
        ledger.counts(rd.path),
        shards=len(originals),
        retry_shards=len(plan["shards"]) - len(originals),
        failed_reasons=download_ledger.failed_reasons(rd.path),
    )


def incomplete_message(rd: RunDir, failed: list[ShardCheck]) -> str:
    lines = [f"{len(failed)} shard(s) did not finish or failed verification; rerun the same command to redo them:"]
    lines += [f"  {c.name}: {'; '.join(c.problems)}" for c in failed[:10]]
    return "\n".join(lines) + f"\n(img2dataset logs: {rd.path / '_logs'})"


STEP = Step("download", DownloadConfig, run)
