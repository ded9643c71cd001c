"""`pretokenize`: image shards -> Arrow code shards + manifest, on Ray actors (or in-process).

    run(cfg, input, output) -> stats
      1. resolve the tokenizer (weights sha256, codebook, downsampling) and the token grid
      2. open the run folder (refuses a different config), read the keep list
      3. encode every shard not yet marked done: one output shard per input shard, same stem,
         on actors that load the tokenizer once (one per GPU, else CPU actors)
      4. (re)write manifest.json from every done shard, then `_stats.json` (reconciled)
"""
from __future__ import annotations

import os
from collections import defaultdict, deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from core import codeshard, ledger
from core.config import ConfigError
from core.imageshard import list_shards
from core.progress import make_progress
from core.rundir import RunDir
from core.vq import grid_shape, vq_info
from pretokenize.preprocess import CROPS
from pretokenize.worker import STEP, EncodeSettings, encode_shard, shard_stem

DTYPES = ("fp32",)  # encoder precisions offered (bf16 changed >0.1% of codes: docs/pretokenize.md)
EXECUTORS = ("ray", "local")


class PretokenizeError(RuntimeError):
    """A run that could not finish (some shards failed); a rerun resumes."""


@dataclass
class PretokenizeConfig:
    res: int = 512  # output image side in pixels; a multiple of the tokenizer's downsampling factor
    vq: str | None = None  # VQ folder: config.json + diffusion_pytorch_model.safetensors
    batch_size: int = 32  # images per encoder call
    crop: str = "center"  # square crop after the resize: "center" or "random" (seeded per sample)
    seed: int = 0  # base seed of random crops; per-sample seed = hash(seed, shard, key)
    keep_list: str | None = None  # parquet with `key`, `shard` columns; only those samples are encoded
    dtype: str = "fp32"  # encoder precision; only fp32 is offered (bf16 changed >0.1% of codes)
    executor: str = "ray"  # "ray" (actors, local or cluster) or "local" (in-process, one worker)
    num_actors: int = 0  # 0 = auto: one per GPU, else cluster CPUs // cpus_per_actor
    cpus_per_actor: int = 0  # CPUs reserved per actor; 0 = auto (CPU actors: min(8, cluster CPUs); GPU: CPUs/GPU up to 8)
    decode_threads: int = 0  # image decode/resize threads per actor; 0 = auto (= the actor's CPUs)
    prefetch_batches: int = 2  # batches decoded ahead of the encoder

    def __post_init__(self) -> None:
        if self.res <= 0:
            raise ValueError(f"res must be positive, got {self.res}")
        if self.batch_size <= 0 or self.prefetch_batches <= 0:
            raise ValueError("batch_size and prefetch_batches must be positive")
        if self.crop not in CROPS:
            raise ValueError(f"crop must be one of {', '.join(CROPS)}, got {self.crop!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.executor not in EXECUTORS:
            raise ValueError(f"executor must be one of {', '.join(EXECUTORS)}, got {self.executor!r}")
        if min(self.num_actors, self.cpus_per_actor, self.decode_threads) < 0:
            raise ValueError("num_actors, cpus_per_actor and decode_threads must be >= 0 (0 = auto)")

    def settings(self, decode_threads: int) -> EncodeSettings:
        return EncodeSettings(self.res, self.crop, self.seed, self.batch_size, decode_threads, self.prefetch_batches)


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


def load_keep_list(path: str | os.PathLike) -> dict[str, frozenset[str]]:
    """keep.parquet (`key`, `shard`) -> {shard stem: keys to encode}."""
    import pyarrow.parquet as pq

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"keep list not found: {p}")
    try:
        table = pq.read_table(p, columns=["key", "shard"])
    except Exception as exc:  # pyarrow raises several types for missing columns / bad files
        raise ConfigError(f"{p}: cannot read the keep list's `key` and `shard` columns ({exc})") from exc
    groups: dict[str, set[str]] = defaultdict(set)
    for key, shard in zip(table.column("key").to_pylist(), table.column("shard").to_pylist()):
        groups[shard_stem(shard)].add(str(key))
    return {k: frozenset(v) for k, v in groups.items()}


def run_config(cfg: PretokenizeConfig, input: Path, sha256: str, keep_sha: str | None) -> dict[str, Any]:
    """What determines the output (not worker counts): recorded in _config.yaml and hashed."""
    return {
        "input": str(input.resolve()), "res": cfg.res, "crop": cfg.crop, "seed": cfg.seed,
        "dtype": cfg.dtype, "vq_sha256": sha256,  # the weights hash is the identity, not the path
        "keep_list": cfg.keep_list and str(Path(cfg.keep_list).resolve()), "keep_list_sha256": keep_sha,
    }


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

    def encode(self, tar: str, run: RunDir, keep: frozenset[str] | None) -> dict[str, Any]:
        return encode_shard(self.vq, tar, run, self.settings, keep)


def _keep_for(keep: dict[str, frozenset[str]] | None, tar: Path) -> frozenset[str] | None:
    return None if keep is None else keep.get(shard_stem(tar.name), frozenset())


def run(cfg: PretokenizeConfig, input: str | os.PathLike, output: str | os.PathLike,
        ray_address: str | None = None) -> dict[str, Any]:
    """Encode every shard of `input` into `output`; returns the `_stats.json` content."""
    if not cfg.vq:
        raise ConfigError("no tokenizer: pass --vq PATH (or set pretokenize.vq in pipelines.yaml)")
    input = Path(input)
    tars = list_shards(input)
    if not tars:
        raise ConfigError(f"{input}: no *.tar image shards")
    tok = vq_info(cfg.vq)
    grid = grid_shape(cfg.res, cfg.res, tok.downsample)
    keep = load_keep_list(cfg.keep_list) if cfg.keep_list else None
    keep_sha = codeshard.file_sha256(cfg.keep_list) if cfg.keep_list else None
    rd = RunDir.open(output, STEP, run_config(cfg, input, tok.sha256, keep_sha))
    todo = [t for t in tars if not rd.is_done(shard_stem(t.name))]
    failures = _execute(cfg, rd, todo, keep, ray_address) if todo else {}
    stats = finish(cfg, rd, tars, tok, grid, failures)
    if failures:
        first = next(iter(failures.items()))
        raise PretokenizeError(
            f"{len(failures)} shard(s) failed (e.g. {first[0]}: {first[1]}); "
            f"the other shards are done and listed in the manifest; rerun to retry the failed ones"
        )
    return stats


def _execute(cfg: PretokenizeConfig, rd: RunDir, todo: list[Path],
             keep: dict[str, frozenset[str]] | None, ray_address: str | None) -> dict[str, str]:
    """Encode `todo` shards with the configured executor; returns {shard: error} of failures."""
    if cfg.executor == "local":
        return _execute_local(cfg, rd, todo, keep)
    return _execute_ray(cfg, rd, todo, keep, ray_address)


def _execute_local(cfg: PretokenizeConfig, rd: RunDir, todo: list[Path],
                   keep: dict[str, frozenset[str]] | None) -> dict[str, str]:
    threads = cfg.cpus_per_actor or (os.cpu_count() or 1)
    enc = ShardEncoder(cfg.vq, cfg.settings(cfg.decode_threads or threads), threads)  # type: ignore[arg-type]
    with make_progress() as progress:
        bar = progress.add_task("pretokenize shards", total=len(todo))
        for tar in todo:
            enc.encode(str(tar), rd, _keep_for(keep, tar))
            progress.advance(bar)
    return {}


def _execute_ray(cfg: PretokenizeConfig, rd: RunDir, todo: list[Path],
                 keep: dict[str, frozenset[str]] | None, ray_address: str | None) -> dict[str, str]:
    import ray

    from core.ray_util import cluster_cpus, cluster_gpus, init_ray

    init_ray(ray_address)
    plan = plan_actors(cfg, cluster_cpus(), cluster_gpus(), len(todo))
    actor_cls = ray.remote(ShardEncoder).options(num_cpus=plan.num_cpus, num_gpus=plan.num_gpus)
    settings = cfg.settings(plan.decode_threads)
    actors = [actor_cls.remote(cfg.vq, settings, plan.num_cpus) for _ in range(plan.count)]
    try:
        return dispatch(actors, todo, lambda a, t: a.encode.remote(str(t), rd, _keep_for(keep, t)))
    finally:
        for a in actors:
            ray.kill(a)


def dispatch(actors: list[Any], jobs: list[Path], submit: Callable[[Any, Path], Any]) -> dict[str, str]:
    """Keep every actor busy with one shard at a time; a failed task is recorded and its actor
    reused, a dead actor is dropped. Returns {shard name: error}."""
    import ray
    from ray.exceptions import RayActorError

    free, queue, inflight, failures = list(actors), deque(jobs), {}, {}
    with make_progress() as progress:
        bar = progress.add_task("pretokenize shards", total=len(jobs))
        while queue or inflight:
            while free and queue:
                actor, job = free.pop(), queue.popleft()
                inflight[submit(actor, job)] = (actor, job)
            if not inflight:  # every actor died
                failures.update({j.name: "no live worker left" for j in queue})
                break
            (ref,), _ = ray.wait(list(inflight), num_returns=1)
            actor, job = inflight.pop(ref)
            try:
                ray.get(ref)
                free.append(actor)
            except RayActorError as exc:
                failures[job.name] = f"worker died: {exc}".splitlines()[0]
            except Exception as exc:  # the task raised: keep the actor, record the shard
                failures[job.name] = f"{type(exc).__name__}: {exc}".splitlines()[0]
                free.append(actor)
            progress.advance(bar)
    return failures


def finish(cfg: PretokenizeConfig, rd: RunDir, tars: list[Path], tok: codeshard.TokenizerInfo,
           grid: tuple[int, int], failures: dict[str, str]) -> dict[str, Any]:
    """(Re)write the manifest from every done shard, then reconcile and write `_stats.json`."""
    infos = {shard_stem(t.name): rd.done_info(shard_stem(t.name)) for t in tars if rd.is_done(shard_stem(t.name))}
    manifest = codeshard.Manifest(
        resolution=cfg.res, grid=grid, tokenizer=tok,
        shards=[codeshard.ShardInfo(**i["shard"]) for i in infos.values() if i.get("shard")],
        extra={"crop": cfg.crop, "seed": cfg.seed, "dtype": cfg.dtype, "source": str(Path(tars[0]).parent.resolve()),
               "config_hash": rd.hash},
    )
    codeshard.write_manifest(rd.path, manifest)
    n_in = sum(int(i["rows_in"]) for i in infos.values())
    damaged = {name: i["damaged"] for name, i in infos.items() if i.get("damaged")}
    secs = sum(float(i.get("seconds") or 0) for i in infos.values())
    stats = ledger.write_stats(
        rd.path, STEP, n_in, ledger.counts(rd.path),
        shards_in=len(tars), shards_done=len(infos), shards_failed=failures,
        damaged_shards=damaged, refused_members=sum(int(i.get("refused", 0)) for i in infos.values()),
        bad_members=sum(len(i.get("bad_members", [])) for i in infos.values()),
        resolution=cfg.res, grid=list(grid), tokens=grid[0] * grid[1] * manifest.num_rows,
        encode_seconds=round(secs, 2),
    )
    return stats
