"""What every section of the report is built from: the settings, the folders found, one duckdb
connection, and the list of problems met on the way (printed by the command, shown in the page)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import duckdb
import pyarrow as pa
import yaml

from core.config import execution
from curate.report.discover import Inventory
from curate.report.html import Html, note

# What reading a run folder's files can raise when they are damaged, partial or vanish
# (json errors are ValueErrors). Anything else is a bug and propagates.
READ_ERRORS = (OSError, ValueError, KeyError, duckdb.Error, pa.ArrowException, yaml.YAMLError)


@dataclass
class ReportConfig:
    """Settings of `curate report` (section `curate.report` of pipelines.yaml)."""

    images_per_side: int = 6  # contact sheets: images just above and just below each threshold
    groups: int = 8  # near-dup groups shown, largest first
    placeholder_groups: int = 4  # placeholder groups shown (one pHash under many hosts)
    group_images: int = 8  # images shown per group at most
    bins: int = 40  # histogram bins
    sample_grids: int = 6  # training sample grids shown, spread evenly over the steps
    check_samples: int = 8  # pretokenize check PNGs shown per code folder
    thumb: int = 112  # thumbnail side in pixels
    max_image_width: int = 1100  # larger images (sample grids, check PNGs) are scaled down to this
    threads: int = execution(2)  # duckdb threads
    memory: str = execution("1GB")  # duckdb memory limit (it spills beyond it)

    def __post_init__(self) -> None:
        counts = ("images_per_side", "groups", "placeholder_groups", "group_images", "sample_grids", "check_samples")
        for name in counts:
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.bins < 2 or self.thumb < 16 or self.max_image_width < 64 or self.threads < 1:
            raise ValueError("bins must be >= 2, thumb >= 16, max_image_width >= 64 and threads >= 1")


@dataclass
class Context:
    cfg: ReportConfig
    inv: Inventory
    con: duckdb.DuckDBPyConnection
    problems: list[str] = field(default_factory=list)  # data that could not be read, one line each

    def guard(self, what: str, build: Callable[..., Html], *args: Any) -> Html:
        """`build(*args)`, or a red note in the page (and a line in `problems`) when the files it
        reads are damaged or vanish mid-read: one bad folder does not cost the whole report."""
        try:
            return build(*args)
        except READ_ERRORS as exc:
            return self.problem(what, exc)

    def problem(self, what: str, exc: BaseException | str, kind: str = "error") -> Html:
        """A red note for the page, also a line in `problems` (the command prints them)."""
        line = f"{what}: {exc if isinstance(exc, str) else f'{type(exc).__name__}: {exc}'}"
        self.problems.append(line)
        return note(f"Could not read {line}" if kind == "error" else line, kind)
