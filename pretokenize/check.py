"""`pretokenize check`: decode code samples back to pixels and look at the tokenizer's health.

Writes to OUT (default CODES/_check):
    sample_NN_<key>.png    input crop | reconstruction side by side (reconstruction only when
                           the source shard recorded in CODES/_config.yaml is gone)
    codebook_usage.png     per-code counts and the sorted-frequency curve
    check.json             PSNR per image, codes used out of K, entropy in bits, warnings
"""
from __future__ import annotations

import math
import os
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

from core import atomic, rundir
from core.codeshard import CodeDataset, CodeShardError
from core.imageshard import iter_shard
from core.vq import decode_codes, load_vq, vq_info


@dataclass
class CheckConfig:
    n: int = 16  # samples decoded and compared, spread evenly over the folder
    vq: str | None = None  # tokenizer folder; None = the path recorded in the manifest
    usage_rows: int = 10000  # rows (evenly spread) counted for the codebook-usage statistics
    min_used_frac: float = 0.10  # warn when fewer codes are used than this share of min(K, tokens counted)
    min_entropy_frac: float = 0.5  # warn when entropy < this share of log2(min(K, tokens counted))
    batch_size: int = 8  # samples per decoder call

    def __post_init__(self) -> None:
        if self.n <= 0 or self.usage_rows <= 0 or self.batch_size <= 0:
            raise ValueError("n, usage_rows and batch_size must be positive")
        if not (0 <= self.min_used_frac <= 1 and 0 <= self.min_entropy_frac <= 1):
            raise ValueError("min_used_frac and min_entropy_frac must lie in [0, 1]")


def spread(total: int, n: int) -> np.ndarray:
    """`n` row indices spread evenly over [0, total) (all rows when total <= n)."""
    return np.unique(np.linspace(0, total - 1, min(n, total)).round().astype(np.int64))


def usage_stats(counts: np.ndarray) -> dict[str, Any]:
    """Codes used and entropy (bits) of a per-code count vector of length K."""
    total = int(counts.sum())
    p = counts[counts > 0] / max(1, total)
    entropy = float(-(p * np.log2(p)).sum()) if total else 0.0
    ceiling = min(len(counts), total) if total else len(counts)
    return {"codebook_size": len(counts), "tokens": total, "codes_used": int((counts > 0).sum()),
            "entropy_bits": entropy, "max_entropy_bits": math.log2(max(1, ceiling))}


def usage_warnings(u: dict[str, Any], cfg: CheckConfig) -> list[str]:
    """Dead/collapsed codebook warnings, judged against what `tokens` draws could reach at most."""
    reachable = min(u["codebook_size"], u["tokens"])
    out = []
    if u["codes_used"] < cfg.min_used_frac * reachable:
        out.append(f"dead codebook: {u['codes_used']} of {u['codebook_size']} codes used "
                   f"(< {cfg.min_used_frac:.0%} of the {reachable} reachable by {u['tokens']} tokens)")
    if u["entropy_bits"] < cfg.min_entropy_frac * u["max_entropy_bits"]:
        out.append(f"collapsed codebook: entropy {u['entropy_bits']:.2f} bits, "
                   f"< {cfg.min_entropy_frac:.0%} of the {u['max_entropy_bits']:.2f} possible")
    return out


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR (dB) of two uint8 images (inf when identical)."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10.0 * math.log10(255.0 ** 2 / mse)


def source_folder(codes: Path) -> Path | None:
    """The image-shard folder the encoding run read (its run folder's recorded input)."""
    record = rundir.step_record(codes)
    source = ((record or {}).get("input") or {}).get("path")
    return Path(source) if source else None


def find_originals(source: Path | None, wanted: dict[str, list[tuple[str, int, int]]], res: int,
                   resize: str = "auto") -> dict[str, np.ndarray]:
    """{key: (res, res, 3) uint8} re-made from the source shards with the recorded crop.
    `wanted` maps shard stem -> [(key, crop_top, crop_left)]; missing shards/keys are skipped.
    `resize` is how the download resized the originals (as recorded in the manifest)."""
    from pretokenize.encode import original_size
    from pretokenize.preprocess import reproduce

    found: dict[str, np.ndarray] = {}
    for stem, items in wanted.items():
        tar = source / f"{stem}.tar" if source else None
        if tar is None or not tar.is_file():
            continue
        crops = {key: (top, left) for key, top, left in items}
        for sample in iter_shard(tar):
            if sample.key in crops and sample.image is not None:
                top, left = crops[sample.key]
                found[sample.key] = reproduce(sample.image, res, original_size(sample.meta or {}), resize, top, left)
    return found


def count_codes(ds: CodeDataset, rows: int) -> np.ndarray:
    """Per-code counts over `rows` rows spread evenly over the folder."""
    k = ds.manifest.codebook_size
    counts = np.zeros(k, dtype=np.int64)
    idx = spread(len(ds), rows)
    for start in range(0, len(idx), 4096):
        counts += np.bincount(ds.codes(idx[start: start + 4096]).ravel(), minlength=k)[:k]
    return counts


def open_checked(folder: Path, vq_path: str | None) -> tuple[CodeDataset, str]:
    """The code folder and a tokenizer path whose weights hash matches its manifest."""
    ds = CodeDataset(folder)
    path = vq_path or ds.manifest.tokenizer.path
    sha = vq_info(path).sha256
    if sha != ds.manifest.tokenizer.sha256:
        raise CodeShardError(
            f"{path}: tokenizer {sha[:12]} is not the one that made {folder} "
            f"({ds.manifest.tokenizer.sha256[:12]}); pass the right --vq"
        )
    return ds, path


def run_check(cfg: CheckConfig, input: str | os.PathLike, output: str | os.PathLike | None = None) -> dict[str, Any]:
    """Decode `cfg.n` samples, compare with their inputs, count codebook use; returns check.json."""
    import torch

    folder = Path(input)
    out = Path(output) if output else folder / "_check"
    ds, vq_path = open_checked(folder, cfg.vq)
    vq = load_vq(vq_path)
    h, w = ds.manifest.grid
    rows = [ds.row(int(i)) | {"stem": ds.shards[ds.locate(int(i))[0]].path.stem} for i in spread(len(ds), cfg.n)]
    wanted: dict[str, list] = defaultdict(list)
    for r in rows:
        wanted[r["stem"]].append((r["key"], r["crop_top"], r["crop_left"]))
    source = source_folder(folder)
    originals = find_originals(source, wanted, ds.manifest.resolution, ds.manifest.extra.get("source_resize", "auto"))
    codes = torch.from_numpy(np.stack([r["codes"] for r in rows]).astype(np.int64)).reshape(-1, h, w)
    recon = np.concatenate([
        (decode_codes(vq, codes[i: i + cfg.batch_size]) * 255).round().byte().permute(0, 2, 3, 1).numpy()
        for i in range(0, len(codes), cfg.batch_size)
    ])  # (n, H, W, 3) uint8
    samples = [_write_sample(out, i, r, recon[i], originals.get(r["key"])) for i, r in enumerate(rows)]
    usage = usage_stats(count_codes(ds, cfg.usage_rows))
    _plot_usage(out / "codebook_usage.png", count_codes(ds, cfg.usage_rows), usage)
    psnrs = [s["psnr"] for s in samples if s["psnr"] is not None]
    report = {
        "input": str(folder), "output": str(out), "vq": vq_path, "source": str(source) if source else None,
        "samples": samples, "mean_psnr": float(np.mean(psnrs)) if psnrs else None,
        "compared": len(psnrs), "decoded_only": len(samples) - len(psnrs),
        "usage": usage, "warnings": usage_warnings(usage, cfg),
    }
    atomic.write_json(out / "check.json", report)
    return report


def _write_sample(out: Path, i: int, row: dict[str, Any], recon: np.ndarray, orig: np.ndarray | None) -> dict[str, Any]:
    """PNG of input | reconstruction (or the reconstruction alone); returns its record."""
    from PIL import Image

    pixels = recon if orig is None else np.concatenate([orig, recon], axis=1)
    safe_key = "".join(c if c.isalnum() or c in "-_" else "_" for c in row["key"])
    path = out / f"sample_{i:02d}_{safe_key}.png"
    with atomic.atomic_path(path) as tmp:
        Image.fromarray(pixels).save(tmp, format="PNG")
    return {"key": row["key"], "shard": row["stem"], "png": path.name,
            "psnr": None if orig is None else psnr(orig, recon),
            "kind": "reconstruction only (source image not found)" if orig is None else "input | reconstruction"}


def _plot_usage(path: Path, counts: np.ndarray, usage: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 3.5))
    a.bar(np.arange(len(counts)), counts, width=1.0)
    a.set(xlabel="code index", ylabel="count", title="tokens per code")
    srt = np.sort(counts)[::-1]
    b.semilogy(np.arange(1, len(srt) + 1), np.maximum(srt, 0.5))
    b.set(xlabel="rank", ylabel="count (log)", title="sorted code frequency")
    fig.suptitle(f"{usage['codes_used']}/{usage['codebook_size']} codes used, entropy {usage['entropy_bits']:.2f} "
                 f"of {usage['max_entropy_bits']:.2f} bits ({usage['tokens']:,} tokens)")
    fig.tight_layout()
    with atomic.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=80)
    plt.close(fig)


def print_report(report: dict[str, Any], console: Console | None = None) -> None:
    console = console or Console()
    table = Table(title=f"pretokenize check: {report['input']}")
    for col in ("key", "shard", "PSNR dB", "png"):
        table.add_column(col)
    for s in report["samples"]:
        table.add_row(s["key"], s["shard"], "-" if s["psnr"] is None else f"{s['psnr']:.2f}", s["png"])
    console.print(table)
    u = report["usage"]
    mean = "n/a" if report["mean_psnr"] is None else f"{report['mean_psnr']:.2f} dB"
    console.print(f"mean PSNR {mean} over {report['compared']} compared images; {report['decoded_only']} decoded only"
                  + ("" if not report["decoded_only"] else " (source shards not found)"))
    console.print(f"codebook: {u['codes_used']}/{u['codebook_size']} codes used, entropy {u['entropy_bits']:.2f} "
                  f"of {u['max_entropy_bits']:.2f} bits over {u['tokens']:,} tokens; PNGs in {report['output']}")
    for w in report["warnings"]:
        console.print(f"[yellow]warning:[/yellow] {w}")
