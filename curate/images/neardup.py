"""`curate neardup`: drop exact and near-duplicate images from webdataset image shards.

    1. hashing (`curate.images.hashing`), one unit per shard: sha256, 64-bit pHash, URL host,
       aesthetic and original size of every sample -> OUT/_hashes/<shard>.parquet;
    2. grouping (`curate.images.group_run`): Ray tasks over files, none holding every image
       and the driver none: placeholders, then exact (sha256) and near (pHash within
       `distance`) duplicates, one image kept per group, by the rules of
       `curate.images.grouping` (whose single-pass `decide` is the reference it equals);
    3. outputs, written by those tasks: the ledger (one part per shard), keep.parquet
       (core.keeplist) for `curate score` and `pretokenize --keep-list`, _groups.parquet; with
       `write_shards`, OUT/<shard>.tar holding only the kept samples (one unit per shard).
Input and output may be local or on an object store (core.storage). A hashing unit records its
shard's size and time in its marker: a shard redone upstream is hashed again, never reused.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from rich.console import Console

from core import ledger, rundir
from core.config import execution
from core.image import DEFAULT_MAX_PIXELS
from core.imageshard import MAX_MEMBER_BYTES, list_shards
from core.rundir import RunDir
from core.units import Unit, run_units
from curate.images import group_run, outputs
from curate.images.hashing import hash_shard
from curate.steps import Step

STEP_NAME = outputs.STEP_NAME
HASH_DIR = "_hashes"
# Version of what the units write (part of the folder's identity: a folder written by another
# version is refused, not finished with mixed files). 2: sha256 stored as 32 bytes; grouping
# as Ray tasks.
FORMAT = 2


@dataclass
class NearDupConfig:
    # Largest Hamming distance between two 64-bit pHashes that still makes them duplicates.
    # 4 of 64 bits catches re-encodes, resizes and small crops; above ~10 unrelated images join.
    distance: int = 4
    # A pHash found under at least this many distinct URL hosts is a placeholder ("image not
    # available", a blank tile): every copy is filtered with reason "placeholder". 0 disables.
    placeholder_hosts: int = 20
    # Images with more pixels than this (read from the header) fail instead of being decoded.
    max_pixels: int = DEFAULT_MAX_PIXELS
    # A tar member larger than this is refused unread (core.imageshard; a generous default).
    max_member_bytes: int = MAX_MEMBER_BYTES
    # Also write OUT/<shard>.tar with only the kept samples (copies the images).
    write_shards: bool = False
    # Multi-index hashing band count (>= distance+1); null picks the fastest for the input size.
    # Results do not depend on it.
    bands: int | None = execution(None)
    # Hash rows per grouping task (a sha256 or pHash bucket, a block of shards, an MIH range):
    # bounds each task's memory; results do not depend on it.
    rows_per_task: int = execution(2_000_000)
    # Use an input folder whose step did not finish (no _stats.json): only what is there.
    allow_incomplete: bool = execution(False)

    def __post_init__(self) -> None:
        if self.rows_per_task < 1:
            raise ValueError(f"rows_per_task must be >= 1, got {self.rows_per_task}")
        if not 0 <= self.distance <= 16:
            raise ValueError(f"distance must be in 0..16 bits of 64, got {self.distance}")
        if self.placeholder_hosts < 0:
            raise ValueError(f"placeholder_hosts must be >= 0 (0 disables), got {self.placeholder_hosts}")
        if self.max_pixels < 1 or self.max_member_bytes < 1:
            raise ValueError(f"max_pixels and max_member_bytes must be >= 1, got {self.max_pixels}, {self.max_member_bytes}")
        if self.bands is not None and not self.distance + 1 <= self.bands <= 64:
            raise ValueError(f"bands must be in distance+1..64 = {self.distance + 1}..64, got {self.bands}")


def run(cfg: NearDupConfig, inp: str, out: str) -> dict[str, Any]:
    """Hash every shard of `inp`, group, write OUT; returns the stats (see module doc)."""
    rundir.check_finished(inp, cfg.allow_incomplete)
    shards = list_shards(inp)
    if not shards:
        raise FileNotFoundError(f"{inp}: no .tar image shards found")
    rd = RunDir.open(out, STEP_NAME, rundir.identity(cfg, rundir.location(inp), format=FORMAT), inputs=[inp])
    hashes = [rd.path / HASH_DIR / f"{s.stem}.parquet" for s in shards]
    units = [Unit(f"hash.{s.stem}", (str(s), str(h), cfg.max_pixels, cfg.max_member_bytes), input=rundir.file_identity(s),
                  outputs=(f"{HASH_DIR}/{h.name}",)) for s, h in zip(shards, hashes)]
    infos = run_units(rd, units, hash_shard, "neardup: hashing shards")
    parts = [group_run.HashPart(str(h), s.name, int(i["rows"]), i.get("input")) for s, h, i in zip(shards, hashes, infos)]
    n = sum(p.rows for p in parts)
    Console(stderr=True).print(f"neardup: grouping {n:,} images (distance <= {cfg.distance})")
    grouped = group_run.run(rd, parts, cfg.distance, cfg.placeholder_hosts, cfg.bands, cfg.rows_per_task)
    written: list[str] = []
    if cfg.write_shards:
        keep = rd.path / "keep.parquet"
        units = [Unit(f"write.{s.stem}", (str(s), str(keep), str(rd.path)), input=rundir.file_identity(keep)) for s in shards]
        run_units(rd, units, outputs.write_kept_shard, "neardup: writing kept shards")
        written = [s.name for s in shards]
    damaged = {s.name: i["damaged"] for s, i in zip(shards, infos) if i.get("damaged")}
    return ledger.write_stats(rd.path, STEP_NAME, n, ledger.counts(rd.path),
                              groups=grouped["groups"], shards=len(shards), damaged_shards=damaged,
                              refused_members=sum(int(i.get("refused", 0)) for i in infos),
                              lost_samples=sum(int(i.get("lost", 0)) for i in infos), parts=written)


STEP = Step(STEP_NAME, NearDupConfig, run)
