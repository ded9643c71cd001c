"""Benchmark: metadata dedup + filter, `curate` against hand-written duckdb queries, same run.

    .venv/bin/python bench/metadata.py            # 10M rows in 8 files, 3 repeats
    .venv/bin/python bench/metadata.py --small    # 1M rows, 1 repeat (a quick check)

Contenders, each a fresh subprocess (so start-up, Ray included, is counted) on the same data,
run in turn within each repeat:
  plain      the query a user would write (issue 11 item 6): one row_number() window by
             trim(URL) with the keep rule (aesthetic, similarity descending, then hash), then
             aesthetic >= 4.5 and pwatermark <= 0.5, COPY to parquet. No ledger, no file/row
             tiebreak, no NaN handling (duckdb sorts NaN first and lets it pass >= 4.5), spaces
             trimmed only: it keeps somewhat different rows. The goals are against it.
  careful    the same query with curate's semantics (NaN as missing, tabs/newlines trimmed,
             null/blank URL and null TEXT dropped, file/row tiebreak): the same rows as curate.
  run        `curate run` of a pipeline [dedup, filter] (one process, one Ray start; fused).
  separate   `curate dedup` then `curate filter` (two processes, two Ray starts).
Both curate contenders write everything they always write: parts, ledgers, markers.
Peak RSS is sampled (psutil, every 50 ms) over the whole process tree, Ray's raylet, GCS and
workers included, as the sum of RSS (an over-estimate: shared pages count once per process).
The curate outputs are checked against the careful query's (row count and sum of hashes).
Task CPU seconds per phase come from the tasks' markers (`task_cpu_seconds`). The load
average is printed before each repeat: the machine may be shared.
"""
from __future__ import annotations

import argparse
import collections
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

PLAIN_SQL = """
COPY (
  SELECT * EXCLUDE (rn) FROM (
    SELECT *, row_number() OVER (PARTITION BY trim(URL)
                                 ORDER BY aesthetic DESC NULLS LAST, similarity DESC NULLS LAST, hash) AS rn
    FROM read_parquet('{inp}/*.parquet'))
  WHERE rn = 1 AND aesthetic >= 4.5 AND pwatermark <= 0.5
) TO '{out}/kept.parquet' (FORMAT parquet)
"""

CAREFUL_SQL = """
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
    return con.execute(f"SELECT count(*), sum(hash::HUGEINT) FROM read_parquet('{folder}/*.parquet')").fetchall()[0]


def task_cpu(*folders: Path) -> dict[str, float]:
    """CPU seconds of the tasks of step folders, per phase (marker name prefix)."""
    out: dict[str, float] = collections.defaultdict(float)
    for folder in folders:
        for m in (folder / "_done").glob("*.json"):
            phase = f"{folder.name}:{m.stem.split('-')[0]}"
            out[phase] += json.loads(m.read_text()).get("task_cpu_seconds", 0.0)
    return {k: round(v, 2) for k, v in sorted(out.items())}


def query(sql: str) -> list[str]:
    # statistics_propagation off: duckdb 2.0.1 otherwise folds isnan() to false from parquet
    # stats that exclude NaN (a wrong answer); curate runs with the same setting.
    code = ("import duckdb; con = duckdb.connect(); "
            f"con.execute(\"SET disabled_optimizers = 'statistics_propagation'\"); con.execute({sql!r})")
    return [PYTHON, "-c", code]


def synth(data: Path, rows: int, files: int) -> None:
    if (data / "_complete").exists():
        return
    shutil.rmtree(data, ignore_errors=True)
    t = time.perf_counter()
    subprocess.run([CURATE, "synth", "--rows", str(rows), "--files", str(files), "--output", str(data)], check=True,
                   stdout=subprocess.DEVNULL)
    (data / "_complete").write_text("")
    print(f"synth: {rows:,} rows in {files} files in {time.perf_counter() - t:.1f} s")


def one_repeat(data: Path, out: Path, yaml_path: Path, env: dict[str, str]) -> dict[str, tuple[float, int, float]]:
    res = {}
    for name, sql in (("plain", PLAIN_SQL), ("careful", CAREFUL_SQL)):
        (out / name).mkdir(parents=True)
        res[name] = measure(query(sql.format(inp=data, out=out / name)), env)
    yaml_path.write_text(json.dumps({"pipelines": {"bench": {"input": str(data), "output": str(out / "run"),
                                                            "steps": ["dedup", "filter"]}}}))
    res["run"] = measure([CURATE, "run", "--config", str(yaml_path), "--pipeline", "bench"], env)
    w1, m1, c1 = measure([CURATE, "dedup", "-i", str(data), "-o", str(out / "sep-dedup"), "--config", str(yaml_path)], env)
    w2, m2, c2 = measure([CURATE, "filter", "-i", str(out / "sep-dedup"), "-o", str(out / "sep-filter"), "--config", str(yaml_path)], env)
    res["separate"] = (w1 + w2, max(m1, m2), c1 + c2)
    return res


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
    synth(data, rows, args.files)
    size = sum(p.stat().st_size for p in data.glob("*.parquet"))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # always a fresh local Ray, as a user's first run
    results: dict[str, list[tuple[float, int, float]]] = collections.defaultdict(list)
    phases: list[dict[str, float]] = []
    loads = []
    import duckdb

    con = duckdb.connect()
    for r in range(repeats):
        loads.append(os.getloadavg()[0])
        out = work / f"out-{r}"
        shutil.rmtree(out, ignore_errors=True)
        for k, v in one_repeat(data, out, work / "bench.yaml", env).items():
            results[k].append(v)
        careful, run_, sep = check(con, out / "careful"), check(con, out / "run" / "filter"), check(con, out / "sep-filter")
        if not careful == run_ == sep:
            raise SystemExit(f"outputs differ: careful query {careful}, run {run_}, separate {sep}")
        plain = check(con, out / "plain")[0]
        phases.append(task_cpu(out / "run" / "dedup", out / "sep-dedup", out / "sep-filter"))
        print(f"repeat {r + 1}/{repeats} (load {loads[-1]:.1f}): " + ", ".join(f"{k} {v[-1][0]:.1f} s" for k, v in results.items())
              + f"; kept: {careful[0]:,} by curate and the careful query, {plain:,} by the plain query")
        shutil.rmtree(out)
    report(rows, args.files, size, repeats, results, phases, loads)


def report(rows: int, files: int, size: int, repeats: int, results: dict, phases: list, loads: list) -> None:
    med = {k: statistics.median(w for w, _, _ in v) for k, v in results.items()}
    peak = {k: max(m for _, m, _ in v) for k, v in results.items()}
    cpu = {k: statistics.median(c for _, _, c in v) for k, v in results.items()}
    ratios = {k: [w / base for (w, _, _), (base, _, _) in zip(v, results["plain"])] for k, v in results.items()}
    print(f"\n{rows:,} rows, {files} files, {size / 1e6:.0f} MB parquet; medians of {repeats}; {os.cpu_count()} CPUs; "
          f"load average at each repeat's start: {', '.join(f'{x:.1f}' for x in loads)}")
    print(f"{'':10s} {'wall s':>8s} {'rows/s':>12s} {'vs plain':>9s} {'same-run ratios':>22s} {'CPU s':>8s} "
          f"{'CPU vs plain':>12s} {'peak RSS GB':>12s}")
    for k in results:
        same = "/".join(f"{x:.2f}" for x in ratios[k])
        print(f"{k:10s} {med[k]:8.2f} {rows / med[k]:12,.0f} {med[k] / med['plain']:9.2f} {same:>22s} "
              f"{cpu[k]:8.1f} {cpu[k] / cpu['plain']:12.2f} {peak[k] / 1e9:12.2f}")
    print("task CPU s per phase (median over repeats): "
          + json.dumps({k: round(statistics.median(p.get(k, 0.0) for p in phases), 2) for k in phases[0]}))
    print(json.dumps({"rows": rows, "files": files, "repeats": repeats, "loads": loads, "median_s": med, "cpu_s": cpu,
                      "ratio_vs_plain": {k: med[k] / med["plain"] for k in med},
                      "same_run_ratios_vs_plain": ratios, "peak_rss_gb": {k: peak[k] / 1e9 for k in peak}}))


if __name__ == "__main__":
    main()
