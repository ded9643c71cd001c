"""Processes that never outlive the process that started them.

A worker that survives its driver keeps writing into an output folder a rerun is already
using. Linux's PR_SET_PDEATHSIG makes the kernel signal a process the moment its parent dies,
however the parent dies (SIGKILL, an OOM kill, Ctrl-C):
  * Ray workers call `die_with_parent(SIGKILL)` when they start a unit (core.units): their
    parent is the node's raylet, which dies with the driver of a local Ray (measured: without
    it a worker in the middle of a task ran on for up to a minute after its driver was killed);
  * the img2dataset worker (curate.download) calls it with SIGTERM and kills its own process
    group on SIGTERM, taking its download pool with it.
"""
from __future__ import annotations

import ctypes
import os
import signal
import sys

_PR_SET_PDEATHSIG = 1
PARENT_ENV = "TESSERA_PARENT_PID"  # a parent's pid, passed to a child that checks it (`expected_parent`)


def die_with_parent(sig: int = signal.SIGKILL, expected_parent: int | None = None) -> None:
    """Have the kernel send `sig` to this process when its parent dies (Linux; elsewhere a
    no-op). If the parent is already not `expected_parent` (it died before this call), `sig`
    is sent at once."""
    if not sys.platform.startswith("linux"):
        return
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
    if expected_parent and os.getppid() != expected_parent:
        os.kill(os.getpid(), sig)
