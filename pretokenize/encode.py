"""Encode one image shard into one code shard: the unit of work of `pretokenize`.

The data path overlaps with the encoder: a thread pool decodes, EXIF-transposes, resizes and
crops the next `prefetch_batches * batch_size` images (PIL releases the GIL), and the encoder
runs on a thread of its own, so the next batch is read and assembled while the current one is
encoded. Every sample of the tar ends in the ledger: `kept`,
`filtered` (not_in_keep_list) or `failed` (undecodable image, no image member, refused member,
or lost: listed as downloaded in the shard's parquet but missing from the tar).
Order of writes: code shard (atomic) -> ledger part (atomic); the unit runner (core.units)
then writes the completion marker.
"""
from __future__ import annotations

import time
import uuid
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any, Iterator

import numpy as np

from core import codeshard, keeplist, laion, ledger, storage
from core.storage import AnyPath
from core.imageshard import MAX_MEMBER_BYTES, ReadReport, Sample, iter_shard
from pretokenize import preprocess
from pretokenize.geometry import TooSmall

STEP = "pretokenize"
SCORES = ("aesthetic", "pwatermark", "punsafe")  # the score columns a code shard carries


@dataclass(frozen=True)
class EncodeSettings:
    """What a worker needs to encode a shard (built by the driver from PretokenizeConfig)."""

    res: int  # square output side in pixels
    crop: str  # "center" | "random"
    seed: int  # base seed of random crops (per-sample seed = preprocess.crop_seed)
    batch_size: int  # images per encoder call
    decode_threads: int  # threads decoding/resizing images
    prefetch_batches: int  # batches decoded ahead of the encoder
    source: str = "auto"  # how the download resized the originals (pretokenize.geometry.SOURCES)
    allow_upscale: bool = False  # crop images with fewer pixels than res (else filtered too_small)
    max_member_bytes: int = MAX_MEMBER_BYTES  # larger tar members are refused unread


def original_size(meta: dict[str, Any]) -> tuple[int, int] | None:
    """The original image's size from img2dataset's .json (original_width/height), if valid."""
    ow, oh = meta.get("original_width"), meta.get("original_height")
    if isinstance(ow, int) and isinstance(oh, int) and not isinstance(ow, bool) and ow > 0 and oh > 0:
        return ow, oh
    return None


class ShardWriter:
    """Accumulates encoded rows and ledger records of one shard."""

    def __init__(self) -> None:
        self.codes: list[np.ndarray] = []
        self.cols: dict[str, list] = {k: [] for k in (
            "key", "caption", "long_caption", "orig_w", "orig_h", "crop_top", "crop_left",
            "aesthetic", "pwatermark", "punsafe")}
        self.records: list[dict[str, Any]] = []

    def keep(self, row: int, sample: Sample, prep: preprocess.Prepared) -> None:
        meta = sample.meta or {}
        long_caption = meta.get("long_caption")
        values = {
            "key": sample.key, "caption": sample.caption or "",
            "long_caption": long_caption if isinstance(long_caption, str) else None,
            "orig_w": prep.orig_w, "orig_h": prep.orig_h, "crop_top": prep.crop_top, "crop_left": prep.crop_left,
            **{name: laion.score_value(meta, name) for name in SCORES},
        }
        for name, value in values.items():
            self.cols[name].append(value)
        note = {"reason": prep.note[0], "value": prep.note[1]} if prep.note else {}
        self.records.append({"row": row, "key": sample.key, "state": "kept", **note})

    def drop(self, row: int, key: str, state: str, reason: str, value: str | None = None) -> None:
        self.records.append({"row": row, "key": key, "state": state, "reason": reason, "value": value})


def _prepare(sample: Sample, shard: str, s: EncodeSettings) -> preprocess.Prepared:
    seed = preprocess.crop_seed(s.seed, shard, sample.key) if s.crop == "random" else 0
    return preprocess.prepare(sample.image, s.res, s.crop, seed, orig=original_size(sample.meta or {}),  # type: ignore[arg-type]
                              source=s.source, allow_upscale=s.allow_upscale)


def prefetched(
    samples: Iterator[Sample], report: ReadReport, pool: ThreadPoolExecutor, window: int, shard: str,
    s: EncodeSettings, keep: frozenset[str] | None, writer: ShardWriter,
) -> Iterator[tuple[int, Sample, Future]]:
    """Yield (row, sample, future of its preprocessing) in tar order, keeping `window` images
    in flight in the pool; samples that need no encoding go straight to the ledger."""
    pending: deque[tuple[int, Sample, Future]] = deque()
    for row, sample in enumerate(samples):
        # iter_shard sets `damaged` before yielding the sample the damage cut into: its image
        # is whole, but a missing caption would silently train as an empty prompt.
        if report.damaged and sample.caption is None:
            writer.drop(row, sample.key, "failed", "truncated_sample", "shard ends inside this sample (no .txt)")
        elif sample.image is None:
            writer.drop(row, sample.key, "failed", "no_image", "sample has no .jpg/.png/.webp member")
        elif keep is not None and sample.key not in keep:
            writer.drop(row, sample.key, "filtered", "not_in_keep_list")
        else:
            pending.append((row, sample, pool.submit(_prepare, sample, shard, s)))
        while len(pending) > window:
            yield pending.popleft()
    yield from pending


def encode_unit(encoder: Any, tar: str, out: str, keep_list: str | None) -> dict[str, Any]:
    """Unit (core.units): encode one shard on an encoder built once per worker (`.vq`,
    `.settings`), encoding only the keep list's samples of that shard when one is given."""
    keep = keeplist.keys_for(keep_list, tar) if keep_list else None
    return encode_shard(encoder.vq, tar, storage.path(out), encoder.settings, keep)


def encode_shard(
    vq: Any, tar: str | AnyPath, out: AnyPath, s: EncodeSettings, keep: frozenset[str] | None = None
) -> dict[str, Any]:
    """Encode `tar` into OUT/<stem>.arrow (on an object store `<stem>.<attempt>.arrow`) and
    write its ledger part; returns the unit's info."""
    from core.vq import encode_codes

    tar = storage.path(tar)
    stem = keeplist.shard_id(tar.name)
    started, report, writer = time.perf_counter(), ReadReport(str(tar)), ShardWriter()
    batch: list[np.ndarray] = []
    encoding: deque[Future] = deque()  # batches handed to the encoder thread, in order
    device = next(vq.parameters()).device

    def encode(pixels: Any) -> np.ndarray:  # runs on the encoder thread
        return encode_codes(vq, pixels).cpu().numpy().reshape(pixels.shape[0], -1)  # (B, h*w)

    def flush(encoder: ThreadPoolExecutor, keep_running: int) -> None:
        """Hand the assembled batch to the encoder thread; collect finished batches until at
        most `keep_running` remain in flight (1 while reading, 0 at the end)."""
        if batch:
            pixels = preprocess.to_unit_tensor(np.stack(batch), device)  # (B, 3, res, res) in [0, 1]
            encoding.append(encoder.submit(encode, pixels))
            batch.clear()
        while len(encoding) > keep_running:
            writer.codes.append(encoding.popleft().result())

    # The encoder runs on its own thread: while it works on batch k (a GPU kernel queue the host
    # waits on, GIL free; or torch's CPU threads), this thread reads the tar, collects decoded
    # images and builds batch k+1 (measured by bench/pretokenize_overlap.py with a simulated
    # 400 ms encoder: 0.78 of the encoder's speed end to end with one thread for both, see
    # bench/RESULTS.md). One batch may wait behind the running one, so at most two are in memory.
    with ThreadPoolExecutor(max(1, s.decode_threads), thread_name_prefix="decode") as pool, \
            ThreadPoolExecutor(1, thread_name_prefix="encode") as encoder:
        window = max(s.batch_size, s.prefetch_batches * s.batch_size)
        for row, sample, fut in prefetched(iter_shard(tar, report, s.max_member_bytes), report, pool, window, stem, s, keep, writer):
            try:
                prep = fut.result()
            except TooSmall as exc:  # fewer pixels than the crop needs: not upscaled by default
                writer.drop(row, sample.key, "filtered", "too_small", str(exc))
                continue
            except Exception as exc:  # undecodable / truncated / bomb-sized image
                writer.drop(row, sample.key, "failed", "undecodable_image", f"{type(exc).__name__}: {exc}")
                continue
            writer.keep(row, sample, prep)
            batch.append(prep.pixels)
            if len(batch) >= s.batch_size:
                flush(encoder, keep_running=1)
        flush(encoder, keep_running=0)
    return _finish(out, tar, stem, writer, report, keep, time.perf_counter() - started)


def _finish(out: AnyPath, tar: AnyPath, stem: str, writer: ShardWriter, report: ReadReport,
            keep: frozenset[str] | None, seconds: float) -> dict[str, Any]:
    """Write the code shard, then the ledger part (the runner writes the marker last)."""
    # every tar member is a row here (a key off the keep list is `not_in_keep_list`), so its later
    # copies are too; a sample the tar lost is a row only if the keep list still wanted it
    unread = [(k, kind, why) for k, kind, why in report.unread()
              if kind != "lost_from_tar" or keep is None or k in keep]
    first = len(writer.records)  # rows number the samples read, then these: no gap for skipped copies
    for j, (key, kind, why) in enumerate(unread):
        writer.drop(first + j, key, "failed", kind, why)
    shard_info = None
    if writer.codes:
        codes = np.concatenate(writer.codes)  # (N, h*w)
        table = codeshard.make_table(codes, writer.cols)
        target = storage.attempt_path(out / f"{stem}{codeshard.SHARD_SUFFIX}", uuid.uuid4().hex[:12])
        shard_info = asdict(codeshard.write_shard(target, table))
    ledger.write(out, stem, ledger.rows(STEP, tar.name, writer.records))
    kept = sum(r["state"] == "kept" for r in writer.records)
    info = {
        "source": str(tar), "shard": shard_info, "rows_in": len(writer.records), "kept": kept,
        "files": ([shard_info["name"]] if shard_info else []) + [f"{ledger.LEDGER_DIR}/{stem}.parquet"],
        "damaged": report.damaged, "refused": len(report.refused), "lost": len(report.lost),
        "duplicates": len(report.duplicates),
        "sizes_corrected": sum(r["state"] == "kept" and bool(r.get("reason")) for r in writer.records),
        "too_small": sum(r.get("reason") == "too_small" for r in writer.records),
        "bad_members": [list(b) for b in report.bad_members],
        "seconds": round(seconds, 3), "images_per_s": round(kept / seconds, 2) if seconds > 0 else None,
    }
    return info
