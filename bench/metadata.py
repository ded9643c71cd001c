"""Benchmark: metadata dedup + filter, `curate` against one hand-written duckdb query, same run.

    .venv/bin/python bench/metadata.py            # 10M rows in 8 files, 3 repeats
    .venv/bin/python bench/metadata.py --small    # 1M rows, 1 repeat (a quick check)

Three contenders, each a fresh subprocess (so start-up, Ray included, is counted) on the same data:
  baseline   one duckdb query (all cores): dedup by trimmed URL keeping the highest aesthetic,
             then similarity, then smallest hash; then aesthetic >= 4.5 and pwatermark <= 0.5
             with NaN/null dropped. It writes the kept rows only (no ledger, no markers).
  run        `curate run` of a pipeline [dedup, filter] (one process, one Ray start).
  separate   `curate dedup` then `curate filter` (two processes, two Ray starts).
Peak RSS is sampled (psutil, every 50 ms) over the whole process tree, Ray's raylet, GCS and
workers included, as the sum of RSS (an over-estimate: shared pages count once per process).
Both curate outputs are checked against the baseline's (row count and sum of hashes).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
CURATE = str(ROOT / ".venv" / "bin" / "curate")
PYTHON = sys.executable

BASELINE_SQL = """
COPY (
  SELECT * EXCLUDE (filename, file_row_number, k) FROM (
    SELECT *, trim(URL, ' \t\n\r' || chr(11) || chr(12)) AS k
    FROM read_parquet('{inp}/*.parquet', filename=true, file_row_number=true)
    WHERE URL IS NOT NULL AND trim(URL, ' \t\n\r' || chr(11) || chr(12)) <> '' AND TEXT IS NOT NULL
    QUALIFY row_number() OVER (PARTITION BY k ORDER BY
      CASE WHEN isnan(aesthetic) THEN NULL ELSE aesthetic END DESC NULLS LAST,
      CASE WHEN isnan(similarity) THEN NULL ELSE similarity END DESC NULLS LAST,
      hash ASC NULLS LAST, filename, file_row_number) = 1)
  WHERE aesthetic >= 4.5 AND NOT isnan(aesthetic) AND pwatermark <= 0.5 AND NOT isnan(pwatermark)
) TO '{out}/kept.parquet' (FORMAT parquet)
"""


def sample(proc: psutil.Process, cpu: dict[int, float]) -> int:
    """RSS sum of the process tree now; records each process's CPU seconds so far in `cpu`."""
    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            total += p.memory_info().rss
            t = p.cpu_times()
            cpu[p.pid] = t.user + t.system
        except psutil.Error:
            pass
    return total


def measure(cmd: list[str], env: dict[str, str] | None = None) -> tuple[float, int, float]:
    """Run `cmd`; returns (wall seconds, peak RSS bytes, CPU seconds of its process tree).
    CPU seconds are sampled, so a process's last <50 ms are missed; on a machine shared with
    other jobs they are the steadier figure."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, cwd=ROOT)
    ps, peak, cpu = psutil.Process(proc.pid), 0, {}
    while proc.poll() is None:
        peak = max(peak, sample(ps, cpu))
        time.sleep(0.05)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr.read().decode()[-3000:]}")
    return wall, peak, sum(cpu.values())


def check(con, folder: Path) -> tuple[int, int]:
    return con.execute(f"SELECT count(*), sum(hash::HUGEINT) FROM read_parquet('{folder}/*.parquet')").fetchone()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", action="store_true", help="1M rows, 1 repeat")
    ap.add_argument("--rows", type=int, default=None)
    ap.add_argument("--files", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--workdir", default="/tmp/tessera_bench_metadata")
    args = ap.parse_args()
    rows = args.rows or (1_000_000 if args.small else 10_000_000)
    repeats = args.repeats or (1 if args.small else 3)
    work = Path(args.workdir)
    data = work / f"laion-{rows}-{args.files}"
    if not (data / "_complete").exists():
        shutil.rmtree(data, ignore_errors=True)
        t = time.perf_counter()
        subprocess.run([CURATE, "synth", "--rows", str(rows), "--files", str(args.files), "--output", str(data)], check=True,
                       stdout=subprocess.DEVNULL)
        (data / "_complete").write_text("")
        print(f"synth: {rows:,} rows in {args.files} files in {time.perf_counter() - t:.1f} s")
    size = sum(p.stat().st_size for p in data.glob("*.parquet"))
    yaml_path = work / "bench.yaml"
    env = {**os.environ, "RAY_ADDRESS": ""}  # always a fresh local Ray, as a user's first run
    env.pop("RAY_ADDRESS")
    results: dict[str, list[tuple[float, int, float]]] = {"baseline": [], "run": [], "separate": []}
    import duckdb

    con = duckdb.connect()
    for r in range(repeats):
        out = work / f"out-{r}"
        shutil.rmtree(out, ignore_errors=True)
        (out / "base").mkdir(parents=True)
        sql = BASELINE_SQL.format(inp=data, out=out / "base")
        # statistics_propagation off: duckdb 2.0.1 otherwise folds isnan() to false from parquet
        # stats that exclude NaN (a wrong answer); curate runs with the same setting.
        base_py = f"import duckdb; con = duckdb.connect(); con.execute(\"SET disabled_optimizers = 'statistics_propagation'\"); con.execute({sql!r})"
        results["baseline"].append(measure([PYTHON, "-c", base_py], env))
        yaml_path.write_text(json.dumps({"pipelines": {"bench": {"input": str(data), "output": str(out / "run"),
                                                                "steps": ["dedup", "filter"]}}}))
        results["run"].append(measure([CURATE, "run", "--config", str(yaml_path), "--pipeline", "bench"], env))
        w1, m1, c1 = measure([CURATE, "dedup", "-i", str(data), "-o", str(out / "sep-dedup"), "--config", str(yaml_path)], env)
        w2, m2, c2 = measure([CURATE, "filter", "-i", str(out / "sep-dedup"), "-o", str(out / "sep-filter"), "--config", str(yaml_path)], env)
        results["separate"].append((w1 + w2, max(m1, m2), c1 + c2))
        base, run_, sep = check(con, out / "base"), check(con, out / "run" / "filter"), check(con, out / "sep-filter")
        if not base == run_ == sep:
            raise SystemExit(f"outputs differ: baseline {base}, run {run_}, separate {sep}")
        print(f"repeat {r + 1}/{repeats}: " + ", ".join(f"{k} {v[-1][0]:.1f} s" for k, v in results.items())
              + f"; {base[0]:,} rows kept by all three")
        shutil.rmtree(out)
    med = {k: statistics.median(w for w, _, _ in v) for k, v in results.items()}
    peak = {k: max(m for _, m, _ in v) for k, v in results.items()}
    cpu = {k: statistics.median(c for _, _, c in v) for k, v in results.items()}
    print(f"\n{rows:,} rows, {args.files} files, {size / 1e6:.0f} MB parquet; medians of {repeats}; "
          f"{os.cpu_count()} CPUs")
    print(f"{'':10s} {'wall s':>8s} {'rows/s':>12s} {'ratio':>7s} {'CPU s':>8s} {'CPU ratio':>10s} {'peak RSS GB':>12s}")
    for k in results:
        print(f"{k:10s} {med[k]:8.2f} {rows / med[k]:12,.0f} {med[k] / med['baseline']:7.2f} "
              f"{cpu[k]:8.1f} {cpu[k] / cpu['baseline']:10.2f} {peak[k] / 1e9:12.2f}")
    print(json.dumps({"rows": rows, "files": args.files, "repeats": repeats, "median_s": med, "cpu_s": cpu,
                      "ratio": {k: med[k] / med["baseline"] for k in med}, "peak_rss_gb": {k: peak[k] / 1e9 for k in peak}}))


if __name__ == "__main__":
    main()
