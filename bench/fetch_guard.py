"""Benchmark: the cost of the network guard and per-URL deadline, against img2dataset's plain urllib fetch.

    .venv/bin/python bench/fetch_guard.py [--fetches N] [--repeats R] [--threads T]

Generated JPEGs (~25 KB) are served on loopback by tests/curate/httpserver.py in a process of
its own, so the figures are the client's. Each repeat fetches the same N URLs with both
variants, alternating which goes first:

  * urllib: what img2dataset does per image (`urllib.request.urlopen`, read the body);
  * guard: `curate.download.fetch.Client.get` under a `Deadline` (URL parsed, host resolved in
    a thread when it is a name, address checked, connection to the checked address, alarm
    armed and cancelled, body read under the byte cap).

Both by address (`127.0.0.1`) and by name (`localhost`: the guard's DNS thread included), one
thread and T threads. Reported: medians over repeats of the wall and CPU microseconds per
fetch (CPU: this process, all threads) and the guard/urllib ratios. Loopback makes the
network nearly free, so this is the guard's overhead at its most visible.
"""
from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "curate"))

import httpserver as hs  # noqa: E402

from curate.download.addresses import AddressPolicy  # noqa: E402
from curate.download.deadline import Deadline  # noqa: E402
from curate.download.fetch import Client  # noqa: E402
from curate.download.limits import Limits  # noqa: E402

LIMITS = Limits(max_bytes=64 << 20, max_pixels=100_000_000, max_aspect_ratio=10.0, max_seconds=60.0)
CLIENT = Client(10.0, "tessera", LIMITS, AddressPolicy.from_cidrs(["127.0.0.0/8", "::1/128"]))
UA = {"User-Agent": "Mozilla/5.0 (compatible; tessera)"}


def serve(port_queue, stop) -> None:
    images = [hs.jpeg(256, 192, seed=s) for s in range(16)]
    with hs.ImageServer(gen_images=images) as server:
        port_queue.put(server.port)
        stop.wait()


def plain(url: str) -> int:
    with urllib.request.urlopen(urllib.request.Request(url, headers=UA), timeout=10) as r:
        return len(r.read())


def guarded(url: str) -> int:
    return len(CLIENT.get(url, Deadline(LIMITS.max_seconds)))


def measure(fn, urls: list[str], threads: int) -> tuple[float, float]:
    """(wall, CPU) microseconds per fetch."""
    w0, c0 = time.perf_counter(), time.process_time()
    if threads == 1:
        sizes = [fn(u) for u in urls]
    else:
        with ThreadPoolExecutor(threads) as pool:
            sizes = list(pool.map(fn, urls))
    wall, cpu = time.perf_counter() - w0, time.process_time() - c0
    assert all(sizes)
    return wall / len(urls) * 1e6, cpu / len(urls) * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fetches", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=16)
    args = ap.parse_args()
    ctx = multiprocessing.get_context("spawn")
    port_queue, stop = ctx.Queue(), ctx.Event()
    server = ctx.Process(target=serve, args=(port_queue, stop), daemon=True)
    server.start()
    port = port_queue.get(timeout=120)
    print(f"{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}; {args.fetches} fetches x {args.repeats} repeats")
    for host in ("127.0.0.1", "localhost"):
        urls = [f"http://{host}:{port}/gen/{i}.jpg" for i in range(args.fetches)]
        for threads in (1, args.threads):
            res: dict[str, list[tuple[float, float]]] = {"urllib": [], "guard": []}
            for r in range(args.repeats):
                order = ("urllib", "guard") if r % 2 == 0 else ("guard", "urllib")
                for name in order:
                    res[name].append(measure(plain if name == "urllib" else guarded, urls, threads))
            med = {k: (statistics.median(w for w, _ in v), statistics.median(c for _, c in v)) for k, v in res.items()}
            print(f"{host:>9} {threads:>2} thread(s): urllib {med['urllib'][0]:6.0f} us wall {med['urllib'][1]:6.0f} us CPU"
                  f" | guard {med['guard'][0]:6.0f} us wall {med['guard'][1]:6.0f} us CPU"
                  f" | guard/urllib wall {med['guard'][0] / med['urllib'][0]:.2f} CPU {med['guard'][1] / med['urllib'][1]:.2f}")
    stop.set()
    server.join(timeout=10)


if __name__ == "__main__":
    main()
