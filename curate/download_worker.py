"""Subprocess entry: `python -m curate.download_worker SPEC.json` runs img2dataset once.

img2dataset starts its logger (and its multiprocessing pool) with the `spawn` context, which
re-imports the main module of the calling process: a caller without an
`if __name__ == "__main__":` guard fails *and still exits 0*. Running it here, in a process
whose main module is guarded and does nothing else on import, makes every entry point
(console script, `curate run`, a notebook, a Ray job) safe; the parent never trusts the exit
code alone and checks each shard's `_stats.json` (see `curate.download`).
"""
from __future__ import annotations

import json
import sys


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m curate.download_worker SPEC.json", file=sys.stderr)
        return 2
    with open(argv[0]) as f:
        spec = json.load(f)
    from curate import download_engine

    download_engine.run(spec)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
