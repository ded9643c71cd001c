"""Benchmark: the metadata pipeline as input grows, on generated LAION-like data (issue 11 item 5).

    .venv/bin/python bench/scale.py                       # 5M, 20M, 50M rows
    .venv/bin/python bench/scale.py --sizes 1 --repeats 1  # a quick check (1M rows)
    .venv/bin/python bench/scale.py --neardup             # also near-dup grouping of 20M hashes (hook)

Data (generated once into --workdir, vectorised, `curate.metadata.synth`): metadata files of
781,250 rows each (64 files = 50M rows) *without* an aesthetic column, as raw laion2B-en ships;
an aesthetic table (hash, aesthetic) covering 40% of the rows, one file per 4 metadata files
(20M rows at 50M); a caption table (url, caption; 10-30 words) covering another 40% (20M rows
at 50M). A size of N million rows uses the first N / 0.78125 files of each, so the tables grow
with the input.

Each run is `curate run` of join (aesthetic by hash) -> dedup -> filter -> captions (min_words
10) in a fresh process with a fresh local Ray, into a fresh output folder. Measured:
  * wall seconds and rows/s (input rows / wall);
  * peak RSS of the driver (the curate process), of the largest Ray worker process (a task),
    and of the whole process tree (sum of RSS, Ray's own processes included), sampled every
    0.2 s with psutil;
  * files created: every file left in the output folder, plus every intermediate file a task's
    marker names (bundles under _work, deleted when their step ends); tasks = markers.
Goals (issue 11): driver peak RSS <= 1 GB and within 20% of the 5M figure at 50M; process tree
< 8 GB; files created <= 4 x tasks; rows/s at 50M >= 0.8 x rows/s at 5M.

Near-dup grouping of 20M hashes belongs to the image steps: with --neardup this script imports
bench/scale_neardup.py (if present) and calls its `run(workdir) -> dict`, printing what it
returns; without that file it says so.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
CURATE = str(ROOT / ".venv" / "bin" / "curate")
ROWS_PER_FILE = 781_250  # 64 files = 50M rows
FILES_PER_TABLE_FILE = 4


# ---------------------------------------------------------------- data


def generate(data: Path, files: int, seed: int = 0) -> None:
    """Metadata, aesthetic and caption files 0..files-1 (those already complete are kept)."""
    from core import atomic
    from curate.metadata import synth

    for d in ("meta", "aesthetic", "captions"):
        (data / d).mkdir(parents=True, exist_ok=True)
    for group in range(0, files, FILES_PER_TABLE_FILE):
        done = data / "_done" / f"{group:05d}"
        if done.exists():
            continue
        scores, captions = [], []
        for i in range(group, min(group + FILES_PER_TABLE_FILE, 64)):
            # Duplicates copy the URL of any row up to this file's end: every prefix of the
            # files (a smaller run) has the same ~10% duplicate share.
            cfg = synth.SynthConfig(rows=ROWS_PER_FILE * (i + 1), files=64, seed=seed)
            t = synth.make_file(cfg, i * ROWS_PER_FILE, (i + 1) * ROWS_PER_FILE)
            ids = np.arange(i * ROWS_PER_FILE, (i + 1) * ROWS_PER_FILE, dtype=np.int64)
            atomic.write_parquet(data / "meta" / f"part-{i:05d}.parquet", t.drop_columns(["aesthetic"]))
            pick = ids % 5 < 2  # 40% of the rows have an aesthetic score
            scores.append(pa.table({"hash": t.column("hash").filter(pa.array(pick)),
                                    "aesthetic": t.column("aesthetic").filter(pa.array(pick))}))
            pick = (ids % 5 == 2) | (ids % 5 == 3)  # another 40% have a long caption
            captions.append(pa.table({"url": synth.url_of(ids[pick]),
                                      "caption": synth.words_of(ids[pick], seed + 1, 10, 30)}))
        atomic.write_parquet(data / "aesthetic" / f"part-{group // 4:05d}.parquet", pa.concat_tables(scores))
        atomic.write_parquet(data / "captions" / f"part-{group // 4:05d}.parquet", pa.concat_tables(captions))
        done.parent.mkdir(exist_ok=True)
        done.write_text("")
        print(f"generated files {group}..{group + FILES_PER_TABLE_FILE - 1}", flush=True)


def inputs(data: Path, files: int, run: Path) -> dict[str, Path]:
    """Folders of links to the first `files` metadata files and their tables' files."""
    out = {}
    for d, n in (("meta", files), ("aesthetic", -(-files // 4)), ("captions", -(-files // 4))):
        folder = run / "in" / d
        folder.mkdir(parents=True)
        for src in sorted((data / d).glob("*.parquet"))[:n]:
            (folder / src.name).symlink_to(src)
        out[d] = folder
    return out


# ---------------------------------------------------------------- measuring


def run_pipeline(cmd: list[str], env: dict[str, str]) -> dict[str, float]:
    """Run `cmd`, sampling its process tree; returns wall and peak RSS figures (bytes)."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, cwd=ROOT)
    driver = psutil.Process(proc.pid)
    peak = {"driver": 0, "task": 0, "tree": 0}
    cpu: dict[int, float] = {}
    while proc.poll() is None:
        tree = 0
        for p in [driver, *driver.children(recursive=True)]:
            try:
                rss = p.memory_info().rss
                t = p.cpu_times()
                cpu[p.pid] = t.user + t.system
                name = " ".join(p.cmdline()[:1])
            except psutil.Error:
                continue
            tree += rss
            if p.pid == driver.pid:
                peak["driver"] = max(peak["driver"], rss)
            elif name.startswith("ray::"):
                peak["task"] = max(peak["task"], rss)
        peak["tree"] = max(peak["tree"], tree)
        time.sleep(0.2)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr.read().decode()[-4000:]}")
    return {"wall_s": wall, "cpu_s": sum(cpu.values()), **{f"peak_{k}_gb": v / 1e9 for k, v in peak.items()}}


def file_counts(out: Path) -> dict[str, int]:
    """Files created under the pipeline's output folder and tasks run (markers)."""
    left = [p for p in out.rglob("*") if p.is_file()]
    markers = [p for p in left if p.parent.name == "_done"]
    intermediate = set()
    for m in markers:
        for name in json.loads(m.read_text()).get("files", []):
            if name.startswith("_work/"):
                intermediate.add((m.parent.parent, name))
    return {"files_left": len(left), "intermediate": len(intermediate), "files_created": len(left) + len(intermediate),
            "tasks": len(markers)}


def one_run(data: Path, millions: float, work: Path, env: dict[str, str]) -> dict[str, float]:
    files = max(1, round(millions * 1e6 / ROWS_PER_FILE))
    generate(data, files)
    run = work / f"run-{millions:g}M"
    shutil.rmtree(run, ignore_errors=True)
    paths = inputs(data, files, run)
    steps = [{"step": "join", "table": str(paths["aesthetic"]), "on": "hash", "columns": ["aesthetic"]},
             "dedup", "filter", {"step": "captions", "captions": str(paths["captions"]), "min_words": 10}]
    yaml_path = run / "pipelines.yaml"
    yaml_path.write_text(json.dumps({"pipelines": {"scale": {"input": str(paths["meta"]), "output": str(run / "out"),
                                                            "steps": steps}}}))
    load = os.getloadavg()[0]
    res = run_pipeline([CURATE, "run", "--config", str(yaml_path), "--pipeline", "scale"], env)
    rows = files * ROWS_PER_FILE
    res.update(file_counts(run / "out"), rows=rows, rows_per_s=rows / res["wall_s"], load=load)
    summary = json.loads((run / "out" / "_summary.json").read_text())
    res["steps"] = {s["step"]: {"rows_in": s["rows_in"], "kept": s["kept"], "seconds": s.get("seconds")} for s in summary["steps"]}
    shutil.rmtree(run)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="5,20,50", help="millions of input rows, comma-separated")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--workdir", default="/tmp/tessera_bench_scale")
    ap.add_argument("--neardup", action="store_true", help="also run bench/scale_neardup.py (near-dup grouping of 20M hashes), if present")
    args = ap.parse_args()
    work = Path(args.workdir)
    data = work / "data"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    sizes = [float(s) for s in args.sizes.split(",")]
    results: dict[float, list[dict]] = {s: [] for s in sizes}
    for r in range(args.repeats):
        for s in sizes:
            res = one_run(data, s, work, env)
            results[s].append(res)
            print(f"repeat {r + 1}, {s:g}M rows (load {res['load']:.1f}): {res['wall_s']:.0f} s, {res['rows_per_s']:,.0f} rows/s, "
                  f"driver {res['peak_driver_gb']:.2f} GB, largest task {res['peak_task_gb']:.2f} GB, tree "
                  f"{res['peak_tree_gb']:.2f} GB, {res['files_created']} files for {res['tasks']} tasks", flush=True)
    report(results)
    if args.neardup:
        neardup_hook(work)


def report(results: dict[float, list[dict]]) -> None:
    med = {s: {k: statistics.median(r[k] for r in rs) for k in rs[0] if isinstance(rs[0][k], (int, float))}
           for s, rs in results.items()}
    print(f"\n{'rows':>8s} {'wall s':>8s} {'rows/s':>10s} {'driver GB':>10s} {'task GB':>8s} {'tree GB':>8s} "
          f"{'files':>7s} {'tasks':>6s} {'files/task':>10s}  (medians of {len(next(iter(results.values())))})")
    for s, m in med.items():
        print(f"{s:7g}M {m['wall_s']:8.1f} {m['rows_per_s']:10,.0f} {m['peak_driver_gb']:10.2f} {m['peak_task_gb']:8.2f} "
              f"{m['peak_tree_gb']:8.2f} {m['files_created']:7.0f} {m['tasks']:6.0f} {m['files_created'] / m['tasks']:10.2f}")
    lo, hi = min(med), max(med)
    print(f"driver RSS {hi:g}M / {lo:g}M: {med[hi]['peak_driver_gb'] / med[lo]['peak_driver_gb']:.2f}; "
          f"rows/s {hi:g}M / {lo:g}M: {med[hi]['rows_per_s'] / med[lo]['rows_per_s']:.2f}")
    print(json.dumps({f"{s:g}M": rs for s, rs in results.items()}, default=str))


def neardup_hook(work: Path) -> None:
    """The image steps' engineer's near-dup grouping at 20M hashes, if bench/scale_neardup.py exists."""
    path = ROOT / "bench" / "scale_neardup.py"
    if not path.exists():
        print("--neardup: bench/scale_neardup.py is not present (near-dup grouping at scale is measured by the image steps)")
        return
    spec = importlib.util.spec_from_file_location("scale_neardup", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    print("neardup:", json.dumps(module.run(work), default=str))


if __name__ == "__main__":
    main()
