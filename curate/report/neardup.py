"""Section "neardup": the largest near-duplicate groups, the kept image beside the dropped ones,
and the placeholder groups (one pHash under many hosts: "image not available" pictures).

Read from a `curate neardup` folder: `_groups.parquet` (one row per group, members kept
first), the ledger (placeholder rows) and `_hashes/` (their pHash); the pictures from the
shards of the folder's recorded input.
"""
from __future__ import annotations

from pathlib import Path

from curate.report.context import Context
from curate.report.discover import Folder
from curate.report.html import Html, code, figure, join, note, table, tag
from curate.report.images import thumb_html, thumbnails
from curate.report.query import sql_str

GROUPS, HASHES = "_groups.parquet", "_hashes"


def build(ctx: Context) -> Html:
    folders = ctx.inv.of("neardup")
    if not folders:
        return note("No `curate neardup` folder among the inputs.", "warn")
    return join(_one(ctx, f) for f in folders)


def _one(ctx: Context, f: Folder) -> Html:
    parts = [tag("h3", join([f"neardup {f.pipeline or ''} ", code(str(f.path))]))]
    if not f.complete:
        return join(parts + [note(f"{f.status()}: groups are decided once every shard is hashed.", "warn")])
    s, cfg = f.stats or {}, f.settings
    parts.append(table(["images in", "kept", "duplicates dropped", "placeholders dropped", "groups", "distance ≤", "placeholder: hosts ≥"],
                       [[int(s.get("rows_in", 0)), int(s.get("kept", 0)), int(s.get("duplicate", 0)),
                         int(s.get("filtered", 0)), int(s.get("groups", 0)), cfg.get("distance"), cfg.get("placeholder_hosts")]]))
    shards = f.input_path
    if shards is None or not shards.is_dir():
        return join(parts + [note("The image shards this step read are gone: no pictures.", "warn")])
    groups = _groups(ctx, f)
    placeholders = _placeholders(ctx, f)
    wanted: dict[Path, set[str]] = {}
    for members in [g[1] for g in groups] + [p[2] for p in placeholders]:
        for shard, key, _ in members:
            wanted.setdefault(shards / shard, set()).add(key)
    thumbs = thumbnails(wanted, ctx.cfg.thumb)
    parts.append(tag("h3", f"largest groups ({len(groups)} of {int(s.get('groups', 0)):,})"))
    parts += [_group(f"group {gid}: {size} images", members, shards, thumbs) for (gid, size), members in groups] or \
        [note("No duplicate group.")]
    parts.append(tag("h3", f"placeholder groups ({len(placeholders)})"))
    parts += [_group(f"pHash {phash:016x}: {n} images, {hosts}", members, shards, thumbs)
              for phash, (n, hosts), members in placeholders] or \
        [note(f"No placeholder image (a pHash under ≥ {cfg.get('placeholder_hosts')} distinct hosts).")]
    return join(parts)


def _groups(ctx: Context, f: Folder) -> list[tuple[tuple[int, int], list[tuple[str, str, str]]]]:
    """The largest groups: ((id, size), [(shard, key, label)]) with the kept member first."""
    path = f.path / GROUPS
    if not path.is_file():
        return []
    rows = ctx.con.execute(
        f"SELECT group_id, size, members, member_shards, distances, reasons FROM read_parquet({sql_str(str(path))}) "
        f"ORDER BY size DESC, group_id LIMIT {int(ctx.cfg.groups)}").fetchall()
    out = []
    for gid, size, keys, shards, dists, reasons in rows:
        labels = ["kept" if r == "kept" else f"{r} d={d}" for r, d in zip(reasons, dists)]
        out.append(((gid, size), list(zip(shards, keys, labels))[: ctx.cfg.group_images]))
    return out


def _placeholders(ctx: Context, f: Folder) -> list[tuple[int, tuple[int, str], list[tuple[str, str, str]]]]:
    """The largest placeholder groups: (pHash, (images, hosts text), [(shard, key, label)])."""
    ledger, hashes = f.path / "_ledger", f.path / HASHES
    if not any(ledger.glob("*.parquet")) or not any(hashes.glob("*.parquet")):
        return []
    rows = ctx.con.execute(
        f"SELECT h.phash, l.source, l.key, l.value FROM read_parquet({sql_str(str(ledger / '[!_]*.parquet'))}) l "
        f"JOIN read_parquet({sql_str(str(hashes / '[!_]*.parquet'))}) h ON h.shard = l.source AND h.key = l.key "
        "WHERE l.state = 'filtered' AND l.reason = 'placeholder' ORDER BY h.phash, l.source, l.key").fetchall()
    by_hash: dict[int, list] = {}
    for phash, shard, key, value in rows:
        by_hash.setdefault(int(phash), []).append((shard, key, value or ""))
    biggest = sorted(by_hash.items(), key=lambda kv: (-len(kv[1]), kv[0]))[: ctx.cfg.placeholder_groups]
    return [(h, (len(m), m[0][2]), [(s, k, "placeholder") for s, k, _ in m[: ctx.cfg.group_images]]) for h, m in biggest]


def _group(title: str, members: list[tuple[str, str, str]], shards: Path, thumbs: dict) -> Html:
    figs = [figure(thumb_html(thumbs.get((str(shards / shard), key)), key), f"{label} · {key}",
                   cls="kept" if label == "kept" else "dropped") for shard, key, label in members]
    return tag("div", join([tag("b", title), tag("div", join(figs), cls="sheet")]), cls="group")
