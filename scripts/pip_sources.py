"""Print the package sources pip is configured with as `uv pip install` flags, one per line.

`make setup` installs with uv (2 cores compile and unpack at once: 88 s for the pinned stack
on the project's 2-core machines, against 263 s for pip), but uv reads no pip configuration.
A machine that points pip at mirrors, local wheel folders or constraint files (pip.conf,
PIP_* variables) gets the same sources for uv from here. Run with the venv's own pip:

    .venv/bin/python scripts/pip_sources.py   ->   --extra-index-url\nfile:///opt/pypi/simple ...
"""
from __future__ import annotations

import shlex
import subprocess
import sys

# pip setting (any scope: global, user, site, env) -> uv flag; values may list several, space-separated
FLAGS = {"index-url": "--index-url", "extra-index-url": "--extra-index-url",
         "find-links": "--find-links", "constraint": "--constraint"}


def pip_settings() -> list[tuple[str, str]]:
    """(setting, value) pairs from `pip config list` (lines like global.find-links='/opt/wheels')."""
    out = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True)
    pairs = []
    for line in out.stdout.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            pairs.append((key.rsplit(".", 1)[-1], " ".join(shlex.split(value))))
    return pairs


def uv_flags(pairs: list[tuple[str, str]]) -> list[str]:
    """Flags for every source in `pairs`, each value once, in the order pip listed them."""
    flags: list[str] = []
    seen: set[tuple[str, str]] = set()
    for key, value in pairs:
        for item in value.split():
            if key in FLAGS and (key, item) not in seen:
                seen.add((key, item))
                flags += [FLAGS[key], item]
    return flags


if __name__ == "__main__":
    print("\n".join(uv_flags(pip_settings())))
