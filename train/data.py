"""Batches from memory-mapped code shards, with a cursor that makes resumption exact.

Order: for epoch e, a permutation of all N rows seeded by (seed, e); rank r of W takes
`perm[r::W]`, cut to N // W rows so every rank has the same count (and so the same number
of steps). The cursor is (epoch, position in the rank's part); restoring it replays exactly
the batches an uninterrupted run would have drawn, including the long-caption coin flips,
which are seeded by (seed, epoch, rank, position) rather than by a running RNG.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from core import storage
from core.codeshard import CodeDataset, CodeShardError, Manifest, stage
from core.config import execution

MICRO_COND_COLUMNS = ("orig_w", "orig_h", "crop_top", "crop_left")  # + the score, last
TEXT_COLUMNS = ("caption", "long_caption")


TYPICAL_ROWS = 1_000_000  # rows (evenly spaced) the sample grid's typical micro-conditions come from


DEFAULT_CACHE = "~/.cache/tessera/codes"


@dataclass
class DataConfig:
    # code-shard folder written by `pretokenize` (holds manifest.json): a local path, or an
    # s3:// / gs:// URI whose shards are staged to `cache` (checked against the manifest) first
    path: str | None = None
    long_caption_prob: float = 0.0  # probability of training on `long_caption` when a row has one
                                    # (rows without one always train on `caption`)
    default_score: float = 6.0  # aesthetic micro-condition for rows whose score is null
    verify_checksums: bool = execution(False)  # sha256 every shard against the manifest at start-up (slow)
    # local folder that holds staged copies of code folders on object stores (reused by later runs)
    cache: str = execution(DEFAULT_CACHE)

    def __post_init__(self) -> None:
        if not 0 <= self.long_caption_prob <= 1:
            raise ValueError(f"data.long_caption_prob must lie in [0, 1], got {self.long_caption_prob}")


class DataMismatchError(CodeShardError):
    """Code shards made for a different resolution or codebook than the stage trains."""


def check_manifest(manifest: Manifest, folder: str, resolution: int | None, codebook_size: int | None) -> None:
    """Refuse shards the stage cannot train on (None = accept any, as the debug stage does)."""
    if resolution is not None and manifest.resolution != resolution:
        raise DataMismatchError(
            f"{folder}: code shards are {manifest.resolution} px, this stage trains at {resolution} px; "
            f"pretokenize with --res {resolution} or pick the matching stage"
        )
    if codebook_size is not None and manifest.codebook_size != codebook_size:
        raise DataMismatchError(
            f"{folder}: codes come from a {manifest.codebook_size}-entry codebook, the model predicts "
            f"{codebook_size}; pretokenize with the model's VQ tokenizer"
        )


@dataclass
class Batch:
    codes: torch.Tensor  # (B, h, w) long
    captions: list[str]  # B prompts (caption or long_caption)
    micro_conds: torch.Tensor  # (B, 5) float32: orig_w, orig_h, crop_top, crop_left, score
    indices: np.ndarray  # (B,) global row ids (for debugging and tests)
    long: np.ndarray  # (B,) bool: the sample's caption is its long caption


class CodeLoader:
    """Endless per-rank batches of one code folder. `state_dict()` is the cursor."""

    def __init__(
        self,
        dataset: CodeDataset,
        batch_size: int,
        seed: int,
        rank: int = 0,
        world: int = 1,
        long_caption_prob: float = 0.0,
        default_score: float = 6.0,
    ):
        self.dataset, self.batch_size, self.seed = dataset, batch_size, seed
        self.rank, self.world = rank, world
        self.long_caption_prob, self.default_score = long_caption_prob, default_score
        self.grid = tuple(dataset.manifest.grid)
        self.per_rank = len(dataset) // world
        if self.per_rank < batch_size:
            raise CodeShardError(
                f"{dataset.folder}: {len(dataset)} rows over {world} ranks give {self.per_rank} per rank, "
                f"fewer than one micro-batch of {batch_size}; lower the batch size or add data"
            )
        self.epoch, self.position = 0, 0
        self._order_epoch, self._order = -1, np.empty(0, np.int64)

    @property
    def batches_per_epoch(self) -> int:
        return self.per_rank // self.batch_size  # the ragged tail of each epoch is dropped

    def epoch_order(self, epoch: int) -> np.ndarray:
        """This rank's rows for `epoch`, in order: perm(seed, epoch)[rank::world][:per_rank]."""
        perm = np.random.default_rng([self.seed, epoch]).permutation(len(self.dataset))
        return perm[self.rank :: self.world][: self.per_rank]

    def next_indices(self) -> tuple[np.ndarray, np.random.Generator]:
        """Advance the cursor by one batch -> (global row ids, the batch's own RNG)."""
        if self.position + self.batch_size > self.batches_per_epoch * self.batch_size:
            self.epoch, self.position = self.epoch + 1, 0
        if self._order_epoch != self.epoch:
            self._order, self._order_epoch = self.epoch_order(self.epoch), self.epoch
        rng = np.random.default_rng([self.seed, self.epoch, self.rank, self.position, 1])
        idx = self._order[self.position : self.position + self.batch_size]
        self.position += self.batch_size
        return idx, rng

    def next_batch(self) -> Batch:
        idx, rng = self.next_indices()
        h, w = self.grid
        codes = torch.from_numpy(self.dataset.codes(idx).astype(np.int64)).view(len(idx), h, w)
        cols = gather_columns(self.dataset, idx, TEXT_COLUMNS + MICRO_COND_COLUMNS + ("aesthetic",))
        captions, long = pick_captions(cols.column("caption").to_pylist(), cols.column("long_caption").to_pylist(),
                                       rng.random(len(idx)), self.long_caption_prob)
        return Batch(codes=codes, captions=captions, micro_conds=micro_conds(cols, self.default_score),
                     indices=idx, long=long)

    def __iter__(self):
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "rank": self.rank, "world": self.world}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if (state["seed"], state["world"]) != (self.seed, self.world):
            raise ValueError(
                f"data cursor was saved with seed {state['seed']} on {state['world']} ranks; this run has "
                f"seed {self.seed} on {self.world} ranks, so the batch order would differ"
            )
        self.epoch, self.position = int(state["epoch"]), int(state["position"])


def gather_columns(dataset: CodeDataset, indices: np.ndarray, names: tuple[str, ...]) -> pa.Table:
    """Columns `names` of global rows `indices`, in that order: one Arrow `take` per shard,
    then one `take` that restores the batch order (no per-row Python)."""
    shard_of = np.searchsorted(dataset.offsets, indices, side="right") - 1
    pieces, positions = [], []
    for s in np.unique(shard_of):
        where = np.nonzero(shard_of == s)[0]
        pieces.append(dataset.shards[s].table.select(list(names)).take(indices[where] - dataset.offsets[s]))
        positions.append(where)
    combined = pa.concat_tables(pieces) if len(pieces) > 1 else pieces[0]
    return combined.take(np.argsort(np.concatenate(positions)))


def pick_captions(captions: list[str], long_captions: list[str | None], draws: np.ndarray, p: float
                  ) -> tuple[list[str], np.ndarray]:
    """Per sample: the long caption when one exists and its draw in [0, 1) is < p, else the caption.
    Returns (the B prompts, (B,) bool: which are long captions)."""
    long = np.array([bool(lc) and d < p for lc, d in zip(long_captions, draws)], dtype=bool)
    return [lc if use else c or "" for c, lc, use in zip(captions, long_captions, long)], long


def micro_conds(cols: pa.Table, default_score: float) -> torch.Tensor:
    """(B, 5) float32 [orig_w, orig_h, crop_top, crop_left, score]; a null score -> default."""
    out = np.empty((cols.num_rows, 5), dtype=np.float32)
    for j, name in enumerate(MICRO_COND_COLUMNS + ("aesthetic",)):
        out[:, j] = cols.column(name).to_numpy(zero_copy_only=False)  # nulls -> NaN
    score = out[:, 4]
    score[np.isnan(score)] = default_score
    return torch.from_numpy(out)


def typical_micro_conds(dataset: CodeDataset, default_score: float, max_rows: int = TYPICAL_ROWS) -> list[float]:
    """Medians of [orig_w, orig_h, crop_top, crop_left, score] over the data (every row, or
    `max_rows` evenly spaced ones): the micro-conditions of the sample grid, so it shows what a
    typical training image looks like rather than a made-up uncropped square. Null values are left
    out; a score column that is all null gives `default_score` (what training feeds such rows)."""
    n = len(dataset)
    idx = np.arange(n) if n <= max_rows else np.linspace(0, n - 1, max_rows).round().astype(np.int64)
    cols = gather_columns(dataset, idx, MICRO_COND_COLUMNS + ("aesthetic",))
    out = []
    for name in MICRO_COND_COLUMNS + ("aesthetic",):
        values = cols.column(name).to_numpy(zero_copy_only=False).astype(np.float64)  # nulls -> NaN
        out.append(float(np.nanmedian(values)) if not np.isnan(values).all() else float("nan"))
    if np.isnan(out[4]):
        out[4] = float(default_score)
    if any(np.isnan(v) for v in out[:4]):
        raise CodeShardError(f"{dataset.folder}: a micro-condition column ({', '.join(MICRO_COND_COLUMNS)}) is all null")
    return out


def open_dataset(cfg: DataConfig) -> CodeDataset:
    """The code folder, memory-mapped; one on an object store is staged to `cfg.cache` first
    (core.codeshard.stage: every shard checked against the manifest, reused by later runs)."""
    if not cfg.path:
        raise CodeShardError("no code shards given: pass --data PATH (a pretokenize output folder)")
    if storage.is_remote(cfg.path):
        return CodeDataset(stage(cfg.path, cfg.cache), verify_checksums=cfg.verify_checksums)
    if not Path(cfg.path).is_dir():
        raise CodeShardError(f"{cfg.path}: not a folder; pass --data PATH (a pretokenize output folder)")
    return CodeDataset(cfg.path, verify_checksums=cfg.verify_checksums)
