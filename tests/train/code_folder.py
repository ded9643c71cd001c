"""A small pretokenize-style code-shard folder, written through `core.codeshard` (train tests,
fault-injection tests)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa

from core.codeshard import Manifest, TokenizerInfo, make_table, write_manifest, write_shard


def write_code_folder(
    folder: Path,
    rows_per_shard: tuple[int, ...] = (10, 7),
    grid: tuple[int, int] = (4, 4),
    codebook: int = 16,
    resolution: int = 64,
    seed: int = 0,
    long_every: int = 2,
    uniform_micro: bool = False,
) -> Path:
    """A pretokenize-style folder: shards of random codes, captions 'a photo number i',
    long captions on every `long_every`-th row, null aesthetic on every third row.
    uniform_micro: every row gets the sampler's micro-conditions (resolution, resolution, 0, 0, 6.0)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    shards, start = [], 0
    for s, n in enumerate(rows_per_shard):
        ids = range(start, start + n)
        codes = rng.integers(0, codebook, size=(n, grid[0] * grid[1]))
        table = make_table(codes, {
            "key": [f"k{i}" for i in ids],
            "caption": [f"a photo number {i}" for i in ids],
            "long_caption": [f"a long description of photo {i}" if i % long_every == 0 else None for i in ids],
            "orig_w": [100 + i for i in ids], "orig_h": [200 + i for i in ids],
            "crop_top": [i % 3 for i in ids], "crop_left": [i % 5 for i in ids],
            "aesthetic": [None if i % 3 == 0 else 5.0 + i / 100 for i in ids],
        })
        if uniform_micro:
            for name, value in (("orig_w", resolution), ("orig_h", resolution), ("crop_top", 0), ("crop_left", 0)):
                table = table.set_column(table.schema.get_field_index(name), name, pa.array([value] * n, pa.int32()))
            table = table.set_column(table.schema.get_field_index("aesthetic"), "aesthetic", pa.array([6.0] * n, pa.float32()))
        shards.append(write_shard(folder / f"{s:05d}.arrow", table))
        start += n
    tok = TokenizerInfo(sha256="0" * 64, path=str(folder / "no-vq"), codebook_size=codebook, downsample=16)
    write_manifest(folder, Manifest(resolution=resolution, grid=grid, tokenizer=tok, shards=shards))
    return folder
