"""A training run folder's log files, as `train` writes them and other tools read them
(`curate report`), so their names and the tolerant reader have one home:

    RUN/metrics.jsonl               one JSON record per log step: {"step", "loss", "lr", ...}
    RUN/samples/step_NNNNNNNN.png   the sample grid of the fixed prompts at that step
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

METRICS = "metrics.jsonl"
SAMPLES = "samples"
_SAMPLE_RE = re.compile(r"^step_(\d+)\.png$")


def read_records(run_dir: str | Path, bad: list[int] | None = None) -> list[dict[str, Any]]:
    """The records of RUN/metrics.jsonl in order ([] when there is none). Only the last line
    may be cut short (a killed run); it is dropped, any other bad line raises, unless `bad` is
    given: then such lines are skipped and their numbers (1-based, among non-blank lines)
    appended to it (readers that show a damaged run rather than refuse it)."""
    path = Path(run_dir) / METRICS
    if not path.is_file():
        return []
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    records = []
    for i, line in enumerate(lines):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                continue
            if bad is None:
                raise
            bad.append(i + 1)
            continue
        if isinstance(record, dict):
            records.append(record)
        elif bad is not None:
            bad.append(i + 1)
        else:
            raise ValueError(f"{path}: line {i + 1} is not a JSON object")
    return records


def sample_path(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / SAMPLES / f"step_{step:08d}.png"


def sample_grids(run_dir: str | Path) -> list[tuple[int, Path]]:
    """(step, path) of every sample grid of a run, by step."""
    folder = Path(run_dir) / SAMPLES
    if not folder.is_dir():
        return []
    found = ((_SAMPLE_RE.match(p.name), p) for p in folder.iterdir())
    return sorted((int(m.group(1)), p) for m, p in found if m)
