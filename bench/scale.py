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
import math
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


def step_costs(out: Path, summary: dict) -> dict[str, dict]:
    """Per step: rows in, task CPU and wall seconds (markers), tasks per phase, the largest
    task's CPU seconds, and bytes written: data parts, ledger parts, intermediate bundles."""
    steps = {}
    for s in summary["steps"]:
        folder = Path(s["output"])
        markers = [json.loads(m.read_text()) | {"_name": m.stem} for m in (folder / "_done").glob("*.json")]
        phases: dict[str, int] = {}
        phase_cpu: dict[str, float] = {}
        for m in markers:
            phase = m["_name"].split("-")[0]
            phases[phase] = phases.get(phase, 0) + 1
            phase_cpu[phase] = round(phase_cpu.get(phase, 0) + m.get("task_cpu_seconds", 0), 2)
        bundle = sum(m[k]["bounds"][-1] for m in markers for k in ("bundle", "dropped") if m.get(k))
        steps[s["step"]] = {
            "rows_in": s["rows_in"], "kept": s["kept"], "seconds": s.get("seconds"), "fused_into": s.get("fused_into"),
            "task_cpu_s": round(sum(m.get("task_cpu_seconds", 0) for m in markers), 2),
            "task_wall_s": round(sum(m.get("task_seconds", 0) for m in markers), 2),
            "max_task_cpu_s": max((m.get("task_cpu_seconds", 0) for m in markers), default=0),
            "tasks": phases, "phase_cpu_s": phase_cpu,
            "part_bytes": sum(p.stat().st_size for p in folder.glob("*.parquet")),
            "ledger_bytes": sum(p.stat().st_size for p in (folder / "_ledger").glob("*.parquet")),
            "bundle_bytes": bundle,
        }
    return steps


def one_run(data: Path, millions: float, work: Path, env: dict[str, str], settings: dict | None = None) -> dict[str, float]:
    files = max(1, round(millions * 1e6 / ROWS_PER_FILE))
    generate(data, files)
    run = work / f"run-{millions:g}M"
    shutil.rmtree(run, ignore_errors=True)
    paths = inputs(data, files, run)
    steps = [{"step": "join", "table": str(paths["aesthetic"]), "on": "hash", "columns": ["aesthetic"]},
             {"step": "dedup"}, {"step": "filter"}, {"step": "captions", "captions": str(paths["captions"]), "min_words": 10}]
    for entry in steps:  # --settings: e.g. the laion pipeline's larger partitions
        entry.update((settings or {}).get(entry["step"], {}))
    yaml_path = run / "pipelines.yaml"
    yaml_path.write_text(json.dumps({"pipelines": {"scale": {"input": str(paths["meta"]), "output": str(run / "out"),
                                                            "steps": steps}}}))
    load = os.getloadavg()[0]
    res = run_pipeline([CURATE, "run", "--config", str(yaml_path), "--pipeline", "scale"], env)
    rows = files * ROWS_PER_FILE
    res.update(file_counts(run / "out"), rows=rows, rows_per_s=rows / res["wall_s"], load=load)
    res["steps"] = step_costs(run / "out", json.loads((run / "out" / "_summary.json").read_text()))
    shutil.rmtree(run)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="5,20,50", help="millions of input rows, comma-separated")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--workdir", default="/tmp/tessera_bench_scale")
    ap.add_argument("--neardup", action="store_true", help="also run bench/scale_neardup.py (near-dup grouping of 20M hashes), if present")
    ap.add_argument("--json", help="also write every measurement to this file (for --project)")
    ap.add_argument("--settings", default="{}", help='step settings over the defaults, as JSON: {"dedup": {"rows_per_bucket": 4000000}}')
    ap.add_argument("--project", help="print the laion2B-en projection (docs/scale.md) from a --json file, and exit")
    args = ap.parse_args()
    if args.project:
        project(json.loads(Path(args.project).read_text()))
        return
    work = Path(args.workdir)
    data = work / "data"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    sizes = [float(s) for s in args.sizes.split(",")]
    results: dict[float, list[dict]] = {s: [] for s in sizes}
    for r in range(args.repeats):
        for s in sizes:
            res = one_run(data, s, work, env, json.loads(args.settings))
            results[s].append(res)
            print(f"repeat {r + 1}, {s:g}M rows (load {res['load']:.1f}): {res['wall_s']:.0f} s, {res['rows_per_s']:,.0f} rows/s, "
                  f"driver {res['peak_driver_gb']:.2f} GB, largest task {res['peak_task_gb']:.2f} GB, tree "
                  f"{res['peak_tree_gb']:.2f} GB, {res['files_created']} files for {res['tasks']} tasks", flush=True)
    report(results)
    if args.json:
        Path(args.json).write_text(json.dumps({f"{s:g}": rs for s, rs in results.items()}, default=str))
        project(json.loads(Path(args.json).read_text()))
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


# laion2B-en as docs/scale.md describes it: 2.3B rows in 128 files, an aesthetic table of
# 2.3B rows (one per hash) in 128 files, long captions for ~40% of the rows (as in the bench),
# and the `laion` pipeline's settings in pipelines.yaml.
LAION = {"rows": 2.3e9, "files": 128, "aesthetic_rows": 2.3e9, "aesthetic_files": 128, "caption_rows": 0.92e9,
         "caption_files": 128, "rows_per_partition": 8e6, "rows_per_bucket": 4e6}


def project(results: dict[str, list[dict]]) -> None:
    """Task CPU per row of each phase at the largest size measured, times laion2B-en's rows,
    run in waves of one task per core on 16 and 64 nodes of 32 cores; bytes per row likewise.
    A phase's tasks are taken as equal (the per-file phases' are: files of ~18M rows)."""
    size = max(results, key=float)
    runs = results[size]
    rows = runs[0]["rows"]
    med = lambda f: statistics.median(f(r) for r in runs)  # noqa: E731
    L = LAION
    kept = {s: med(lambda r: r["steps"][s]["kept"]) / rows for s in runs[0]["steps"]}
    join_parts = math.ceil((L["rows"] + L["aesthetic_rows"]) / L["rows_per_partition"])
    buckets = math.ceil(L["rows"] / L["rows_per_bucket"])
    caption_parts = math.ceil((L["rows"] * kept["filter"] + L["caption_rows"]) / L["rows_per_partition"])
    tasks = {("join", "t"): L["aesthetic_files"], ("join", "m"): L["files"], ("join", "part"): join_parts,
             ("dedup", "p1"): join_parts, ("dedup", "p2"): buckets, ("dedup", "p3"): join_parts,
             ("captions", "t"): L["caption_files"], ("captions", "m"): join_parts, ("captions", "part"): caption_parts}
    print(f"\nlaion2B-en projection from the {size}M-row runs (medians of {len(runs)}; task CPU of this machine's cores): "
          f"{L['rows'] / 1e9:.1f}B rows in {L['files']} files; join: {join_parts} partitions, dedup: {buckets} buckets, "
          f"captions: {caption_parts} partitions")
    print(f"{'step':9s} {'phase':6s} {'tasks':>6s} {'CPU us/row':>10s} {'CPU h':>7s} {'min @16x32':>10s} {'min @64x32':>10s}")
    hours = {16: 0.0, 64: 0.0}
    for (step, phase), n in tasks.items():
        cpu_h = med(lambda r: r["steps"][step]["phase_cpu_s"].get(phase, 0)) / rows * L["rows"] / 3600
        line = f"{step:9s} {phase:6s} {n:6d} {cpu_h * 3600 / L['rows'] * 1e6:10.3f} {cpu_h:7.1f}"
        for nodes in hours:
            wall = math.ceil(n / (nodes * 32)) * cpu_h / n  # waves of one task per core
            hours[nodes] += wall
            line += f" {wall * 60:10.2f}"
        print(line)
    print(f"{'total':9s} {'':6s} {sum(tasks.values()):6d} {'':10s} {'':7s} {hours[16] * 60:10.2f} {hours[64] * 60:10.2f}")
    print(f"{'step':9s} {'TB parts':>9s} {'TB ledger':>10s} {'TB shuffle':>11s}  (bytes per input row of the pipeline x {L['rows'] / 1e9:.1f}B)")
    for step in runs[0]["steps"]:
        b = [med(lambda r: r["steps"][step][k]) / rows * L["rows"] / 1e12 for k in ("part_bytes", "ledger_bytes", "bundle_bytes")]
        print(f"{step:9s} {b[0]:9.2f} {b[1]:10.2f} {b[2]:11.2f}")


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
