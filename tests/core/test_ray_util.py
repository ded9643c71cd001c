"""core.ray_util: a local Ray started by init_ray starts quietly (no token notice, no INFO
line) and stops completely through shutdown_local."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import psutil

SCRIPT = """
import json, ray
from core.ray_util import init_ray, shutdown_local
assert init_ray() == "local"
node = ray._private.worker._global_node
pids = {kind: [i.process.pid for i in infos] for kind, infos in node.all_processes.items()}
shutdown_local()
assert not ray.is_initialized()
print(json.dumps(pids))
"""


def test_shutdown_local_stops_every_node_process():
    # Runs in its own process: the test session's shared Ray must stay up.
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, "-c", SCRIPT], cwd=root, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    pids = json.loads(out.stdout.strip().splitlines()[-1])
    assert "monitor" in pids and "raylet" in pids  # the processes the fast path deals with exist
    # A local Ray keeps token authentication without printing Ray's notice about it every start.
    assert "Token authentication" not in out.stderr
    # Nor Ray's INFO line about starting (the command's own output says what it does).
    assert "Started a local Ray instance" not in out.stderr + out.stdout
    deadline = time.time() + 10
    alive = [p for ps in pids.values() for p in ps if psutil.pid_exists(p)]
    while alive and time.time() < deadline:
        time.sleep(0.2)
        alive = [p for p in alive if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
    assert not alive
