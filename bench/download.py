"""Benchmark: `curate download` against plain img2dataset, same URLs, same loopback server, same run.

    .venv/bin/python bench/download.py [--small] [--images N] [--repeats R] [--processes P]

Generated JPEGs are served by a threaded loopback server (tests/curate/httpserver.py) in a
process of its own (so neither variant's parent shares a GIL with the server). Each
repeat runs both variants on the same input parquet, alternating which goes first, into
fresh folders. Plain img2dataset gets the same settings (webdataset, size, resize mode,
processes, threads, sha256, retries, user agent, extra columns), run in its own guarded
subprocess, as `curate download` runs it. Reported per variant (medians over repeats):
end-to-end images/s (start-up included), download-phase images/s (from the shards'
_stats.json: first shard start to last shard end) and the peak summed RSS of the process tree.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "curate"))

import httpserver as hs  # noqa: E402

from curate.download import step as dl  # noqa: E402

IMAGE_SIZE, SHARD = 256, 500
SERVER_PID: int | None = None  # the image server's process, left out of the RSS figures


def baseline_main(spec_path: str) -> None:
    """Plain img2dataset, as a user would call it from a guarded script."""
    import img2dataset

    img2dataset.download(**json.loads(Path(spec_path).read_text()))


def serve(port_queue, stop) -> None:
    """Server process: 64 distinct generated JPEGs behind gen/<i>.jpg until `stop` is set."""
    images = [hs.jpeg(384, 288, seed=s) for s in range(64)]
    with hs.ImageServer(gen_images=images) as server:
        port_queue.put((server.port, sum(map(len, images)) // len(images)))
        stop.wait()


def make_input(folder: Path, port: int, n: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({
        "URL": [f"http://127.0.0.1:{port}/gen/{i}.jpg" for i in range(n)],
        "TEXT": [f"a generated picture number {i}" for i in range(n)],
        "aesthetic": [5.0 + (i % 10) / 10 for i in range(n)],
        "pwatermark": [0.1] * n,
    }), folder / "part-0.parquet")
    return folder


class PeakRSS:
    """Peak of the summed RSS of this process's descendants, sampled every 0.2 s."""

    def __init__(self) -> None:
        self.peak, self._stop = 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        me = psutil.Process()
        while not self._stop.wait(0.2):
            total = 0
            for p in me.children(recursive=True):
                if p.pid == SERVER_PID:
                    continue
                try:
                    total += p.memory_info().rss
                except psutil.Error:
                    pass
            self.peak = max(self.peak, total)

    def __enter__(self) -> "PeakRSS":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def phase_rate(out: Path) -> float:
    """Images per second of the download phase, from img2dataset's per-shard stats."""
    stats = [json.loads(p.read_text()) for p in out.glob("*_stats.json") if not p.name.startswith("_")]
    count = sum(s["count"] for s in stats)
    span = max(s["end_time"] for s in stats) - min(s["start_time"] for s in stats)
    return count / span


def run_curate(inp: Path, out: Path, cfg: dl.DownloadConfig) -> dict:
    with PeakRSS() as rss:
        t0 = time.perf_counter()
        stats = dl.run(cfg, str(inp), str(out))
        wall = time.perf_counter() - t0
    return {"wall": wall, "kept": stats["kept"], "phase": phase_rate(out), "rss": rss.peak}


def run_plain(inp: Path, out: Path, cfg: dl.DownloadConfig) -> dict:
    spec = {
        "url_list": str(inp), "input_format": "parquet", "url_col": "URL", "caption_col": "TEXT",
        "save_additional_columns": ["aesthetic", "pwatermark"], "output_folder": str(out),
        "output_format": "webdataset", "image_size": cfg.image_size, "resize_mode": cfg.resize_mode,
        "processes_count": cfg.processes, "thread_count": cfg.threads,
        "number_sample_per_shard": cfg.samples_per_shard, "timeout": cfg.timeout, "retries": cfg.retries,
        "compute_hash": "sha256", "extract_exif": False, "user_agent_token": cfg.user_agent_token,
        "enable_wandb": False,
    }
    spec_path = out.parent / f"{out.name}.spec.json"
    spec_path.write_text(json.dumps(spec))
    env = dict(os.environ, NO_ALBUMENTATIONS_UPDATE="1", WANDB_MODE="disabled")
    with PeakRSS() as rss:
        t0 = time.perf_counter()
        subprocess.run([sys.executable, __file__, "--baseline-worker", str(spec_path)], check=True, env=env,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wall = time.perf_counter() - t0
    kept = sum(json.loads(p.read_text())["successes"] for p in out.glob("*_stats.json"))
    return {"wall": wall, "kept": kept, "phase": phase_rate(out), "rss": rss.peak}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", action="store_true", help="600 images, 1 repeat (a smoke run)")
    ap.add_argument("--images", type=int, default=4000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--processes", type=int, default=2)
    ap.add_argument("--threads", type=int, default=32)
    ap.add_argument("--baseline-worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.baseline_worker:
        return baseline_main(args.baseline_worker)
    n, repeats = (600, 1) if args.small else (args.images, args.repeats)
    cfg = dl.DownloadConfig(image_size=IMAGE_SIZE, processes=args.processes, threads=args.threads,
                            samples_per_shard=SHARD, metadata_columns=["aesthetic", "pwatermark"],
                            allow_networks=["127.0.0.0/8"])  # the guard refuses loopback unless allowed
    ctx = multiprocessing.get_context("spawn")
    port_queue, stop = ctx.Queue(), ctx.Event()
    server = ctx.Process(target=serve, args=(port_queue, stop), daemon=True)
    server.start()
    global SERVER_PID
    SERVER_PID = server.pid
    port, size = port_queue.get(timeout=120)
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, {psutil.virtual_memory().total / 2**30:.0f} GiB, "
          f"load {os.getloadavg()[0]:.1f}; {n} images of ~{size // 1024} KB, "
          f"{args.processes} processes x {args.threads} threads, {repeats} repeats")
    results: dict[str, list[dict]] = {"curate": [], "plain": []}
    with tempfile.TemporaryDirectory() as tmp:
        inp = make_input(Path(tmp) / "in", port, n)
        for r in range(repeats):
            order = ("plain", "curate") if r % 2 == 0 else ("curate", "plain")
            for name in order:
                out = Path(tmp) / f"{name}-{r}"
                res = (run_curate if name == "curate" else run_plain)(inp, out, cfg)
                results[name].append(res)
                print(f"  repeat {r} {name:6s}: {res['wall']:6.1f} s wall, {n / res['wall']:6.1f} img/s end-to-end, "
                      f"{res['phase']:6.1f} img/s download phase, kept {res['kept']}, peak RSS {res['rss'] / 2**20:,.0f} MiB")
                shutil.rmtree(out)
    stop.set()
    server.join(timeout=10)
    report(results, n)


def report(results: dict[str, list[dict]], n: int) -> None:
    med = {k: {m: statistics.median(r[m] for r in v) for m in ("wall", "phase", "rss")} for k, v in results.items()}
    for k, m in med.items():
        print(f"{k:6s} median: {n / m['wall']:6.1f} img/s end-to-end, {m['phase']:6.1f} img/s download phase, "
              f"peak RSS {m['rss'] / 2**20:,.0f} MiB")
    e2e = med["plain"]["wall"] / med["curate"]["wall"]
    phase = med["curate"]["phase"] / med["plain"]["phase"]
    print(f"ratio curate/plain images/s: end-to-end {e2e:.3f}, download phase {phase:.3f} (goal >= 0.95)")


if __name__ == "__main__":
    main()
