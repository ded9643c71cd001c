"""Section "folders": every run folder found, its state, and its resolved settings
(`_config.yaml`: the step's settings and the input it read)."""
from __future__ import annotations

import yaml

from curate.report.context import Context
from curate.report.discover import Folder
from curate.report.html import Html, code, details, join, note, pre, table, tag


def build(ctx: Context) -> Html:
    inv = ctx.inv
    rows = [[f.pipeline or "", tag("b", f.step), code(str(f.path)), _state(f), _counts(f)] for f in inv.folders]
    parts = [table(["pipeline", "step", "folder", "state", "rows in → kept"], rows)]
    parts += [note(p, "warn") for p in inv.problems]
    parts.append(tag("h3", "resolved settings"))
    parts += [details(join([tag("b", f.step), " ", code(str(f.path))]), _config(f)) for f in inv.folders]
    return join(parts)


def _state(f: Folder) -> str:
    return {"train": "run folder", "check": "check output"}.get(f.kind) or f.status()


def _counts(f: Folder) -> str:
    if not f.stats:
        return ""
    return f"{int(f.stats.get('rows_in', 0)):,} → {int(f.stats.get('kept', 0)):,}"


def _config(f: Folder) -> Html:
    if not f.config:
        return note("No _config.yaml (made by an older version, or not a step's run folder).", "info")
    return pre(yaml.safe_dump(f.config, sort_keys=False, allow_unicode=True))
