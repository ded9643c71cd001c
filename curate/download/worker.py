"""Subprocess entry: `python -m curate.download.worker SPEC.json` runs img2dataset once.

img2dataset starts its logger (and its multiprocessing pool) with the `spawn` context, which
re-imports the main module of the calling process: a caller without an
`if __name__ == "__main__":` guard fails *and still exits 0*. Running it here, in a process
whose main module is guarded and does nothing else on import, makes every entry point
(console script, `curate run`, a notebook, a Ray job) safe; the parent never trusts the exit
code alone and verifies each shard (`curate.download.verify`). img2dataset is imported only
in this process, never in the driver.

This process leads its own process group (its pool's processes join it). It dies with the
driver (`core.procs.die_with_parent`), and on SIGTERM it kills the whole group, so no download
process outlives the run that started it.
"""
from __future__ import annotations

import json
import os
import signal
import sys


def _kill_group(signum: int, frame: object) -> None:
    os.killpg(os.getpgrp(), signal.SIGKILL)  # itself included: nothing is left half-running


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m curate.download.worker SPEC.json", file=sys.stderr)
        return 2
    from core.procs import PARENT_ENV, die_with_parent

    signal.signal(signal.SIGTERM, _kill_group)
    die_with_parent(signal.SIGTERM, int(os.environ.get(PARENT_ENV, "0") or 0))
    with open(argv[0]) as f:
        spec = json.load(f)
    from curate.download import engine

    engine.run(spec)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
