"""`pretokenize`: image shards -> Arrow code shards + manifest, on Ray actors (or in-process).

    run(cfg, input, output) -> stats
      1. resolve the tokenizer (weights sha256, codebook, downsampling) and the token grid
      2. open the run folder (refuses a different config)
      3. encode every shard not yet done (core.units): one output shard per input shard, same
         stem, on actors that load the tokenizer once (one per GPU, else CPU actors); a unit
         records its input shard's size and time, so a shard redone upstream is encoded again
      4. (re)write manifest.json from every done shard; once all are done, `_stats.json`
Input and output may be local or on an object store (s3://, gs://; core.storage): shards are
streamed; on an object store each code shard is uploaded under an attempt-unique name
(`<stem>.<attempt>.arrow`: attempts never overwrite each other, and a GPU's codes may differ
between attempts), the manifest names the one its unit's marker committed, and shards no
manifest names (abandoned attempts) are deleted when the step completes.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from core import codeshard, keeplist, ledger, rundir, storage
from core.config import ConfigError, execution, settings
from core.errors import StepIncomplete
from core.imageshard import MAX_MEMBER_BYTES, list_shards
from core.rundir import RunDir
from core.storage import AnyPath
from core.units import EXECUTORS, Resources, Unit, run_units
from core.vq import grid_shape, vq_info
from pretokenize.encode import STEP, EncodeSettings, encode_unit
from pretokenize.geometry import DOWNLOAD_MODES, SOURCES
from pretokenize.preprocess import CROPS

DTYPES = ("fp32",)  # encoder precisions offered (bf16 changed >0.1% of codes: docs/pretokenize.md)


@dataclass
class PretokenizeConfig:
    res: int = 512  # output image side in pixels; a multiple of the tokenizer's downsampling factor
    vq: str | None = None  # VQ folder: config.json + diffusion_pytorch_model.safetensors
    batch_size: int = execution(32)  # images per encoder call
    crop: str = "center"  # square crop after the resize: "center" or "random" (seeded per sample)
    seed: int = 0  # base seed of random crops; per-sample seed = hash(seed, shard, key)
    keep_list: str | None = None  # parquet with `key`, `shard` columns; only those samples are encoded
    allow_upscale: bool = False  # encode images with fewer pixels than res (upscaled); else filtered too_small
    max_member_bytes: int = MAX_MEMBER_BYTES  # a larger tar member is refused unread (core.imageshard)
    # How the download resized the originals (pretokenize.geometry): auto = the download folder's
    # resize_mode, else inferred per image; rescale | center_crop | border to say it.
    source_resize: str = "auto"
    dtype: str = "fp32"  # encoder precision; only fp32 is offered (bf16 changed >0.1% of codes)
    executor: str = execution("ray")  # "ray" (actors, local or cluster) or "local" (in-process, one worker)
    num_actors: int = execution(0)  # 0 = auto: one per GPU, else cluster CPUs // cpus_per_actor
    cpus_per_actor: int = execution(0)  # CPUs reserved per actor; 0 = auto (CPU actors: min(8, cluster CPUs); GPU: CPUs/GPU up to 8)
    decode_threads: int = execution(0)  # image decode/resize threads per actor; 0 = auto (= the actor's CPUs)
    prefetch_batches: int = execution(2)  # batches decoded ahead of the encoder
    allow_incomplete: bool = execution(False)  # use an unfinished upstream folder (no _stats.json) as it is

    def __post_init__(self) -> None:
        if self.res <= 0:
            raise ValueError(f"res must be positive, got {self.res}")
        if self.batch_size <= 0 or self.prefetch_batches <= 0:
            raise ValueError("batch_size and prefetch_batches must be positive")
        if self.source_resize not in SOURCES:
            raise ValueError(f"source_resize must be one of {', '.join(SOURCES)}, got {self.source_resize!r}")
        if self.crop not in CROPS:
            raise ValueError(f"crop must be one of {', '.join(CROPS)}, got {self.crop!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.executor not in EXECUTORS:
            raise ValueError(f"executor must be one of {', '.join(EXECUTORS)}, got {self.executor!r}")
        if min(self.num_actors, self.cpus_per_actor, self.decode_threads) < 0:
            raise ValueError("num_actors, cpus_per_actor and decode_threads must be >= 0 (0 = auto)")

    def settings(self, decode_threads: int, source: str = "auto") -> EncodeSettings:
        return EncodeSettings(self.res, self.crop, self.seed, self.batch_size, decode_threads, self.prefetch_batches,
                              source, self.allow_upscale, self.max_member_bytes)


def declared_source(cfg: PretokenizeConfig, input: AnyPath) -> str:
    """How the download resized the originals: as configured, else the download folder's own
    resize_mode (its run record), else `auto` (inferred per image)."""
    if cfg.source_resize != "auto":
        return cfg.source_resize
    record = rundir.step_record(input)
    if record is None or record["step"] != "download":
        return "auto"
    return DOWNLOAD_MODES.get(record["settings"].get("resize_mode"), "auto")


@dataclass(frozen=True)
class ActorPlan:
    count: int  # actors to start
    num_cpus: int  # Ray CPUs reserved per actor (= torch threads on CPU actors)
    num_gpus: int  # 1 on GPU clusters, else 0
    decode_threads: int  # preprocessing threads per actor


def plan_actors(cfg: PretokenizeConfig, cpus: int, gpus: int, n_shards: int) -> ActorPlan:
    """Size the actor pool: one actor per GPU (CPUs shared out among them), else CPU actors of
    `cpus_per_actor` cores each (one actor using every core of a small machine)."""
    if gpus > 0:
        count = cfg.num_actors or gpus
        num_cpus = cfg.cpus_per_actor or max(1, min(8, cpus // max(1, count)))
    else:
        num_cpus = min(cpus, cfg.cpus_per_actor or min(8, cpus))
        count = cfg.num_actors or max(1, cpus // num_cpus)
    count = max(1, min(count, n_shards))
    return ActorPlan(count, num_cpus, 1 if gpus > 0 else 0, cfg.decode_threads or num_cpus)


def identity(cfg: PretokenizeConfig, input: AnyPath, sha256: str, keep_id: Any) -> dict[str, Any]:
    """What determines the output: the settings, where the shards are (each unit records its
    shard), the tokenizer by its weights' hash (not its path) and the keep list's identity."""
    kept = {k: v for k, v in settings(cfg).items() if k not in ("vq", "keep_list")}
    return rundir.identity(kept, rundir.location(input), vq_sha256=sha256, keep_list=keep_id)


class ShardEncoder:
    """Holds the tokenizer (loaded once) and encodes shards; the body of each Ray actor."""

    def __init__(self, vq_path: str, settings: EncodeSettings, threads: int, device: str | None = None):
        import torch

        from core.vq import load_vq

        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device.startswith("cuda"):
            # fp32 means fp32: TF32 convs/matmuls would change codes near codebook ties.
            torch.backends.cudnn.allow_tf32 = False
            torch.backends.cuda.matmul.allow_tf32 = False
        else:
            torch.set_num_threads(max(1, threads))
        self.settings, self.device = settings, device
        self.vq = load_vq(vq_path, device=device)



def run(cfg: PretokenizeConfig, input: str | os.PathLike, output: str | os.PathLike,
        ray_address: str | None = None) -> dict[str, Any]:
    """Encode every shard of `input` into `output`; returns the `_stats.json` content. Raises
    StepIncomplete (after writing the manifest of the shards that are done) if some failed."""
    if not cfg.vq:
        raise ConfigError("no tokenizer: pass --vq PATH (or set pretokenize.vq in pipelines.yaml)")
    rundir.check_finished(input, cfg.allow_incomplete)
    input = storage.path(input)
    tars = list_shards(input)
    if not tars:
        raise ConfigError(f"{input}: no *.tar image shards")
    tok = vq_info(cfg.vq)
    grid = grid_shape(cfg.res, cfg.res, tok.downsample)
    keep_id = None
    if cfg.keep_list:
        keeplist.check(cfg.keep_list)
        keep_id = codeshard.file_sha256(cfg.keep_list)
    rd = RunDir.open(output, STEP, identity(cfg, input, tok.sha256, keep_id), inputs=[input])
    keep_list = keeplist.canonical(cfg.keep_list, rd.path) if cfg.keep_list else None
    units = [Unit(keeplist.shard_id(t.name), (str(t), str(rd.path), keep_list),
                  input={"shard": rundir.file_identity(t), "keep_list": keep_id}) for t in tars]
    source = declared_source(cfg, input)
    try:
        _execute(cfg, rd, units, ray_address, source)
    except StepIncomplete:
        write_manifest(cfg, rd, tars, tok, grid)  # the shards that are done stay usable
        raise
    return finish(cfg, rd, tars, tok, grid)


def _execute(cfg: PretokenizeConfig, rd: RunDir, units: list[Unit], ray_address: str | None, source: str) -> None:
    """Run the encoding units on the configured executor (one tokenizer per worker)."""
    if cfg.executor == "local":
        threads = cfg.cpus_per_actor or (os.cpu_count() or 1)
        plan = ActorPlan(1, threads, 0, cfg.decode_threads or threads)
    else:
        from core.ray_util import cluster_cpus, cluster_gpus, init_ray

        init_ray(ray_address)
        plan = plan_actors(cfg, cluster_cpus(), cluster_gpus(), len(units))
    settings_ = cfg.settings(plan.decode_threads, source)
    run_units(rd, units, encode_unit, "pretokenize shards", Resources(plan.num_cpus, plan.num_gpus),
              setup=ShardEncoder, setup_args=(cfg.vq, settings_, plan.num_cpus), actors=plan.count,
              executor=cfg.executor)


def write_manifest(cfg: PretokenizeConfig, rd: RunDir, tars: list[AnyPath], tok: codeshard.TokenizerInfo,
                   grid: tuple[int, int]) -> dict[str, dict[str, Any]]:
    """(Re)write manifest.json from every done shard; returns their marker infos by shard id."""
    names = [keeplist.shard_id(t.name) for t in tars]
    infos = {n: rd.done_info(n) for n in names if rd.is_done(n)}
    manifest = codeshard.Manifest(
        resolution=cfg.res, grid=grid, tokenizer=tok,
        shards=[codeshard.ShardInfo(**i["shard"]) for i in infos.values() if i.get("shard")],
        extra={"crop": cfg.crop, "seed": cfg.seed, "dtype": cfg.dtype, "source": str(tars[0].parent),
               "source_resize": declared_source(cfg, tars[0].parent), "allow_upscale": cfg.allow_upscale,
               "config_hash": rd.hash},
    )
    codeshard.write_manifest(rd.path, manifest)
    return infos


def finish(cfg: PretokenizeConfig, rd: RunDir, tars: list[AnyPath], tok: codeshard.TokenizerInfo,
           grid: tuple[int, int]) -> dict[str, Any]:
    """Every shard is done: the manifest, abandoned attempts removed, then the reconciled
    `_stats.json` (the completion record)."""
    infos = write_manifest(cfg, rd, tars, tok, grid)
    named = {i["shard"]["name"] for i in infos.values() if i.get("shard")}
    for p in rd.path.glob(f"*{codeshard.SHARD_SUFFIX}"):  # listed only to delete what no marker names
        if p.name not in named:
            p.unlink(missing_ok=True)
    n_in = sum(int(i["rows_in"]) for i in infos.values())
    damaged = {name: i["damaged"] for name, i in infos.items() if i.get("damaged")}
    secs = sum(float(i.get("seconds") or 0) for i in infos.values())
    kept = sum(int(i["kept"]) for i in infos.values())
    return ledger.write_stats(
        rd.path, STEP, n_in, ledger.counts(rd.path),
        shards_in=len(tars), shards_done=len(infos),
        damaged_shards=damaged, refused_members=sum(int(i.get("refused", 0)) for i in infos.values()),
        lost_samples=sum(int(i.get("lost", 0)) for i in infos.values()),
        bad_members=sum(len(i.get("bad_members", [])) for i in infos.values()),
        sizes_corrected=sum(int(i.get("sizes_corrected", 0)) for i in infos.values()),
        too_small=sum(int(i.get("too_small", 0)) for i in infos.values()),
        resolution=cfg.res, grid=list(grid), tokens=grid[0] * grid[1] * kept,
        encode_seconds=round(secs, 2),
    )
