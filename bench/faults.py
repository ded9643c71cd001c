"""Fault injection at a larger scale than the test suite: the figures of bench/RESULTS.md.

For every long-running command (`curate run` of the metadata steps, `curate download`,
`curate neardup`, `curate score`, `pretokenize`, `train run`):
  * an uninterrupted reference run;
  * a chain of --kills SIGKILLs of the driver at random points, each rerun resuming the last,
    then one rerun to the end, while a reader keeps opening every visible output file;
  * a separate run with one worker (a Ray worker running a unit, or an img2dataset pool
    process) killed mid-task, then reruns until it ends;
and counts: faults injected, kills that landed mid-run, reruns that finished, rows lost and
rows doubled (the ledger against the completion record), outputs equal to the reference,
partial files a reader saw. Then the hostile inputs of the download tests (corrupt, bombs,
stalls, trickles, redirects into private networks, file: URLs ...) with their outcomes, and the
addresses the network guard refused.

    .venv/bin/python bench/faults.py [--kills 8] [--out bench/_work/faults] [--only download,train]

The harness is tests/faults/harness.py; the commands and their inputs are the fault tests' own.
"""
from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# bench/ itself must not be on the path: bench/train.py would shadow the train package
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"]
sys.path.insert(0, str(ROOT))
for sub in ("tests/faults", "tests/curate", "tests/curate/download", "tests/train"):
    sys.path.insert(0, str(ROOT / sub))

import harness as H  # noqa: E402
import httpserver as hs  # noqa: E402


def campaign(name: str, cmd_for, snapshot, reference_out: Path, work: Path, kills: int, worker_match,
             seed: int, accounting_folders) -> dict:
    """Reference, a chain of kills, a worker kill; the row of the results table."""
    row = {"command": name, "faults": 0, "landed": 0, "reruns_ok": 0, "lost": 0, "doubled": 0,
           "equal": True, "partial_reads": 0, "survivors": 0}
    t0 = time.perf_counter()
    assert H.run_to_end(cmd_for(reference_out), work / f"{name}-ref.log") == 0, f"{name}: the reference run failed"
    ref = snapshot(reference_out)
    out = work / f"{name}-killed"
    cmd = cmd_for(out)
    reader = H.PartialReader(cmd.folders)
    reader.start()
    records = H.chain_of_kills(cmd, kills, random.Random(seed), work / f"{name}-killed.log")
    rc = H.run_to_end(cmd, work / f"{name}-killed.log")
    row["partial_reads"] = len(reader.stop())
    row["faults"] += len(records)
    row["landed"] += sum(r.mid_run for r in records)
    row["survivors"] += sum(len(r.survivors) for r in records)
    row["reruns_ok"] += int(rc == 0)
    row["equal"] &= rc == 0 and snapshot(out) == ref
    for folder in accounting_folders(out):
        acc = H.accounting(folder)
        row["lost"] += acc["lost"]
        row["doubled"] += acc["doubled"]
    if worker_match is not None:
        wout = work / f"{name}-worker"
        wcmd = cmd_for(wout)
        rc, killed = H.kill_a_worker(wcmd, work / f"{name}-worker.log", worker_match, random.Random(seed + 1), settle=0.2)
        row["faults"] += int(killed)
        row["landed"] += int(killed)
        for _ in range(3):
            if rc == 0:
                break
            rc = H.run_to_end(wcmd, work / f"{name}-worker.log")
        row["reruns_ok"] += int(rc == 0)
        row["equal"] &= rc == 0 and snapshot(wout) == ref
    row["seconds"] = round(time.perf_counter() - t0, 1)
    return row


def metadata(work: Path, kills: int) -> dict:
    import test_metadata_faults as M

    M.build(work / "meta", rows=400_000)
    return campaign("curate run (dedup, filter, captions)", lambda out: M.command(work / "meta", out), M.snapshot,
                    work / "meta-ref", work, kills, H.ray_task_worker, 1,
                    lambda out: [out / s for s in M.STEPS])


def download(work: Path, kills: int, server: hs.ImageServer) -> dict:
    import test_download_faults as D

    (work / "dl").mkdir(parents=True, exist_ok=True)
    D.build(work / "dl", server)

    def pool(p) -> bool:
        line = " ".join(p.cmdline())
        return "multiprocessing" in line and "resource_tracker" not in line

    return campaign("curate download", lambda out: D.command(work / "dl", out), D.snapshot, work / "dl-ref", work,
                    kills, pool, 2, lambda out: [out])


def images(work: Path, kills: int) -> list[dict]:
    import test_image_faults as I

    I.build(work / "img")
    return [campaign(name, lambda out, n=name: I.command(n, work / "img", out), lambda out, n=name: I.snapshot(n, out),
                     work / f"img-ref-{name}", work, kills, H.ray_task_worker, 3 + i, lambda out: [out])
            for i, name in enumerate(I.COMMANDS)]


def train(work: Path, kills: int) -> dict:
    import test_train_faults as T

    T.build(work / "train")

    def snapshot(run_dir: Path) -> tuple:
        weights, state = T.final(run_dir)
        return tuple((k, v.numpy().tobytes()) for k, v in sorted(weights.items())), state["step"], str(state["cursor"])

    return campaign("train run", lambda out: T.command(work / "train", out), snapshot, work / "train-ref", work,
                    kills, None, 9, lambda out: [])


def hostile(work: Path, server: hs.ImageServer) -> list[dict]:
    """The download tests' hostile inputs, one run: each case's outcome against the expected one."""
    import test_download as TD
    from curate.download import step as dl

    root = work / "hostile"
    TD._write_input(root / "in", server, TD.FAST, "a.parquet")
    TD._write_input(root / "in", server, TD.SLOW, "b.parquet")
    dl.run(dl.DownloadConfig(**TD.CFG), str(root / "in"), str(root / "out"))
    got = TD._ledger_by_caption(root / "out")
    rows = []
    for name, (_, state, reason) in TD.CASES.items():
        r = got[name]
        rows.append({"input": name, "outcome": r["state"] + (f" ({r['reason']})" if r["reason"] else ""),
                     "expected": r["state"] == state and r["reason"] == reason})
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kills", type=int, default=8, help="SIGKILLs of the driver per command (default 8)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "_work" / "faults"))
    ap.add_argument("--only", default="", help="comma list of: metadata, download, images, train, hostile")
    args = ap.parse_args(argv)
    work = Path(args.out)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    only = set(filter(None, args.only.split(","))) or {"metadata", "download", "images", "train", "hostile"}
    rows, cases = [], []
    def done(new: list[dict]) -> None:  # each campaign's figures as soon as it ends
        rows.extend(new)
        for r in new:
            print(json.dumps(r), flush=True)

    with hs.ImageServer() as server:
        if "metadata" in only:
            done([metadata(work, args.kills)])
        if "download" in only:
            done([download(work, args.kills, server)])
        if "images" in only:
            done(images(work, args.kills))
        if "train" in only:
            done([train(work, args.kills)])
        if "hostile" in only:
            cases = hostile(work, server)
    print("| command | faults injected | landed mid-run | reruns that finished | rows lost | rows doubled | "
          "outputs = uninterrupted | partial files seen | processes left writing | seconds |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['command']} | {r['faults']} | {r['landed']} | {r['reruns_ok']} | {r['lost']} | {r['doubled']} | "
              f"{'yes' if r['equal'] else 'NO'} | {r['partial_reads']} | {r['survivors']} | {r['seconds']} |")
    if cases:
        blocked = sum("blocked_address" in c["outcome"] for c in cases)
        print(f"\nhostile inputs: {len(cases)} tried, {sum(c['expected'] for c in cases)} ended as expected; "
              f"{blocked} refused by the network guard (blocked_address)")
        for c in cases:
            print(f"  {c['input']}: {c['outcome']}{'' if c['expected'] else '  <-- UNEXPECTED'}")
    (work / "results.json").write_text(json.dumps({"rows": rows, "hostile": cases}, indent=2))
    ok = all(r["equal"] and not r["lost"] and not r["doubled"] and not r["partial_reads"] for r in rows)
    return 0 if ok and all(c["expected"] for c in cases) else 1


if __name__ == "__main__":
    sys.exit(main())
