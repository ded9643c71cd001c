"""Plots of the report: matplotlib figures rendered to PNG bytes in memory.

`Figure` is used directly (no pyplot): no global figure registry, no backend switch, nothing
left open between plots.
"""
from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter

DPI = 80
# Fixed margins: a "tight" layout draws every figure twice (half the report's plotting time).
MARGINS = dict(left=0.11, right=0.98, top=0.9, bottom=0.16)


@dataclass(frozen=True)
class Series:
    label: str
    counts: np.ndarray  # (bins,) counts per bin
    color: str


def compact(value: float, _pos: object = None) -> str:
    """Axis numbers as 800, 12k, 2.5M: short labels, and no "1e6" offset over the title."""
    for size, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= size:
            return f"{value / size:g}{suffix}"
    return f"{value:g}"


def png(fig: Figure) -> bytes:
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    return buf.getvalue()


def histogram(edges: np.ndarray, series: list[Series], title: str, xlabel: str,
              thresholds: list[tuple[float, str]] = (), log: bool = False) -> bytes:
    """Step histograms over shared bin `edges` ((bins + 1,)), one per series, with a dashed
    vertical line per threshold labelled with its rule."""
    fig = Figure(figsize=(6.4, 3.2))
    fig.subplots_adjust(**MARGINS)
    ax = fig.add_subplot()
    for s in series:
        ax.stairs(s.counts, edges, label=s.label, color=s.color, fill=s.color == "#c9ced6", linewidth=1.6)
    for value, label in thresholds:
        ax.axvline(value, color="#d93025", linestyle="--", linewidth=1.4, label=label)
    ax.set(xlabel=xlabel, ylabel="rows")
    ax.set_title(title, fontsize=10)
    if log:
        ax.set_yscale("log")
    ax.yaxis.set_major_formatter(FuncFormatter(compact))
    ax.legend(fontsize=8, frameon=False)
    return png(fig)


def curve(x: list[float], ys: dict[str, list[float]], title: str, xlabel: str) -> bytes:
    """One line per named series (e.g. loss), sharing x."""
    fig = Figure(figsize=(6.4, 3.2))
    fig.subplots_adjust(**MARGINS)
    ax = fig.add_subplot()
    for name, y in ys.items():
        ax.plot(x, y, label=name, linewidth=1.4)
    ax.set(title=title, xlabel=xlabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, frameon=False)
    return png(fig)


def bars(labels: list[str], counts: list[int], title: str) -> bytes:
    """Horizontal bars, largest first as given."""
    fig = Figure(figsize=(6.4, 0.6 + 0.32 * max(1, len(labels))), layout="tight")  # labels of any length
    ax = fig.add_subplot()
    y = np.arange(len(labels))[::-1]
    ax.barh(y, counts, color="#d93025")
    ax.set_yticks(y, labels, fontsize=8)
    ax.set(title=title, xlabel="rows")
    return png(fig)
