"""Observability: RUN/metrics.jsonl (one JSON record per log step), TensorBoard, loss curve.

On resume the records after the resumed step are dropped (a killed run may have logged past
its last checkpoint), so metrics.jsonl always reads as one uninterrupted run.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from core import atomic
from core.trainlog import METRICS, read_records  # noqa: F401  (the log's format lives in core)

LOSS_PNG = "loss.png"


def throughput(samples: int, tokens: int, seconds: float) -> dict[str, float]:
    """samples/s and tokens/s over an interval (image tokens: h*w per sample)."""
    seconds = max(seconds, 1e-9)
    return {"samples_per_s": samples / seconds, "tokens_per_s": tokens / seconds}


def mfu(tokens_per_s: float, flops_per_token: float, peak_flops: float | None) -> float | None:
    """Model FLOPs utilisation: achieved training FLOP/s over the devices' peak (None if unknown)."""
    if not peak_flops:
        return None
    return tokens_per_s * flops_per_token / peak_flops


class MetricsLog:
    """Writes metrics on the main rank only; other ranks get a no-op instance (enabled=False)."""

    def __init__(self, run_dir: str | Path, enabled: bool, resume_step: int, tensorboard: bool = True):
        self.run_dir, self.enabled = Path(run_dir), enabled
        self.writer = None
        if not enabled:
            return
        kept = [r for r in read_records(run_dir) if r["step"] <= resume_step]
        atomic.write_text(self.run_dir / METRICS, "".join(json.dumps(r) + "\n" for r in kept))
        self._file = open(self.run_dir / METRICS, "a")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step drops events a killed run wrote after its last checkpoint.
            self.writer = SummaryWriter(str(self.run_dir / "tb"), purge_step=resume_step + 1)

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = dict(record, time=time.time())
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self.writer is not None:
            for key, value in record.items():
                if key not in ("step", "time") and isinstance(value, (int, float)):
                    self.writer.add_scalar(f"train/{key}", value, record["step"])

    def plot(self) -> Path | None:
        """RUN/loss.png from metrics.jsonl (matplotlib, Agg backend)."""
        records = [r for r in read_records(self.run_dir) if "loss" in r]
        if not self.enabled or not records:
            return None
        return plot_loss(records, self.run_dir / LOSS_PNG)

    def close(self) -> None:
        if self.enabled:
            self._file.close()
            if self.writer is not None:
                self.writer.close()


def plot_loss(records: list[dict[str, Any]], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["step"] for r in records], [r["loss"] for r in records], lw=1)
    ax.set(xlabel="optimizer step", ylabel="masked-token cross-entropy", title="training loss")
    ax.grid(alpha=0.3)
    with atomic.atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
    return path
