"""Section "pretokenize": what the code folder holds (manifest, counts) and the tokenizer's
health as `pretokenize check` recorded it: input beside reconstruction, PSNR, codebook usage.

The report does not decode codes itself (that needs the VQ and torch, and is the pretokenize
stage's job): it reads the files `pretokenize check` writes (`check.json` and its PNGs, by
default CODES/_check/) and says how to make them when they are missing.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from core.codeshard import MANIFEST, CodeShardError, read_manifest

from curate.report.context import Context
from curate.report.discover import Folder
from curate.report.html import Html, code, esc, figure, join, note, table, tag
from curate.report.images import embed_file

DAMAGED_SHOWN = 5  # damaged input shards named; the rest counted
ZOOM = 128  # check PNGs shorter than this (64 px reconstructions) are enlarged, pixels kept sharp


def build(ctx: Context) -> Html:
    folders, checks = ctx.inv.of("pretokenize"), ctx.inv.of("check")
    if not folders and not checks:
        return note("No code folder (pretokenize output) among the inputs.", "warn")
    used: set[Path] = set()
    parts = []
    for f in folders:
        check = next((c for c in checks if _checked_folder(c) == f.path.resolve()), None)
        used.add(check.path if check else f.path)
        parts.append(_one(ctx, f, check))
    parts += [_check(ctx, c, None) for c in checks if c.path not in used]
    return join(parts)


def _checked_folder(check: Folder) -> Path | None:
    """The code folder a check looked at: the parent of a default CODES/_check, else the
    `input` check.json records (as it was given, so relative to where the check ran)."""
    if (check.path.parent / MANIFEST).is_file() and check.path.name == "_check":
        return check.path.parent.resolve()
    recorded = _read_check(check).get("input")
    return Path(recorded).resolve() if recorded else None


def _read_check(check: Folder) -> dict[str, Any]:
    return json.loads((check.path / "check.json").read_text())


def _one(ctx: Context, f: Folder, check: Folder | None) -> Html:
    parts = [tag("h3", join(["codes ", code(str(f.path))]))]
    if not f.complete and (f.path / MANIFEST).is_file():
        parts.append(note(f"{f.status()}: the manifest lists the shards finished when it was last written.", "warn"))
    elif not f.complete:  # a killed run: the manifest is written once every unit has run
        return join(parts + [note(join([f"{f.status()}: no {MANIFEST} yet; rerun the same ", code("pretokenize"),
                                        " command to finish it."]), "warn")])
    try:
        m = read_manifest(f.path)
    except CodeShardError as exc:
        return join(parts + [ctx.problem(f"Pretokenize: {f.path}", str(exc))])
    s = f.stats or {}
    parts.append(table(["images encoded", "failed", "resolution", "grid", "codebook", "tokenizer", "shards"],
                       [[m.num_rows, int(s.get("failed", 0)), f"{m.resolution} px", f"{m.grid[0]}×{m.grid[1]}",
                         m.codebook_size, f"{m.tokenizer.path} ({m.tokenizer.sha256[:12]})", len(m.shards)]]))
    damaged = s.get("damaged_shards") if isinstance(s.get("damaged_shards"), dict) else {}
    if damaged:  # the encode kept what these shards' readable samples gave; the rest is lost
        shown = "; ".join(f"{name}: {why}" for name, why in list(damaged.items())[:DAMAGED_SHOWN])
        more = f"; and {len(damaged) - DAMAGED_SHOWN} more" if len(damaged) > DAMAGED_SHOWN else ""
        parts.append(note(f"{len(damaged)} damaged input shard(s), their readable samples encoded: {shown}{more}", "warn"))
    if check is None:
        return join(parts + [note(join(["No `pretokenize check` output beside this folder: run ",
                                        code(f"pretokenize check --input {f.path}"),
                                        " to see reconstructions, PSNR and codebook usage."]), "warn")])
    if (check.path / "check.json").stat().st_mtime < (f.path / MANIFEST).stat().st_mtime:
        parts.append(note("The check is older than the codes' manifest: rerun `pretokenize check` to refresh it.", "warn"))
    return join(parts + [_check(ctx, check, f)])


def _check(ctx: Context, check: Folder, codes: Folder | None) -> Html:
    r = _read_check(check)
    head = [] if codes else [tag("h3", join(["pretokenize check ", code(str(check.path))]))]
    u = r.get("usage") or {}
    mean = r.get("mean_psnr")
    summary = table(["mean PSNR", "images compared", "decoded only", "codes used", "entropy (bits)"],
                    [["n/a" if mean is None else f"{mean:.2f} dB", int(r.get("compared", 0)), int(r.get("decoded_only", 0)),
                      f"{u.get('codes_used', 0):,} of {u.get('codebook_size', 0):,}",
                      f"{u.get('entropy_bits', 0):.2f} of {u.get('max_entropy_bits', 0):.2f}"]])
    warns = [note(w, "warn") for w in r.get("warnings", [])]
    samples = [s for s in r.get("samples", []) if (check.path / s.get("png", "")).is_file()][: ctx.cfg.check_samples]
    figs = [figure(embed_file(check.path / s["png"], ctx.cfg.max_image_width, s["key"], min_height=ZOOM),
                   f"{s.get('kind', '')} · {s['key']}" + ("" if s.get("psnr") is None else f" · {s['psnr']:.2f} dB"))
            for s in samples]
    usage = check.path / "codebook_usage.png"
    usage_fig = [embed_file(usage, ctx.cfg.max_image_width, "codebook usage")] if usage.is_file() else []
    missing = [] if samples else [note("The check's sample PNGs are gone.", "warn")]
    return join(head + [summary] + warns + [tag("div", join(figs))] + missing + usage_fig)
