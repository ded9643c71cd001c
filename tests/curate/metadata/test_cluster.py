"""The metadata pipeline on a 2-node Ray cluster on this machine (ray.cluster_utils.Cluster,
one CPU per node), input and output on S3, the driver in an empty working folder: tasks run on
both nodes and share nothing but the object store. Ray allows one connection per process and
the session's local Ray is this process's, so the cluster and its driver run in a subprocess."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

from core import storage
from curate.metadata import synth

ROOT = Path(__file__).resolve().parents[3]

DRIVER = """
import json, sys
from ray.cluster_utils import Cluster
import ray
cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
cluster.add_node(num_cpus=1)
cluster.wait_for_nodes()
ray.init(address=cluster.address)
try:
    from rich.console import Console
    from curate import pipeline
    doc = json.loads(sys.argv[1])
    pipeline.run(doc, "p", Console(quiet=True))
finally:
    ray.shutdown()
    cluster.shutdown()
"""


def test_two_nodes_share_only_the_object_store(s3, tmp_path):
    synth.run(synth.SynthConfig(rows=2000, files=4, seed=2), tmp_path / "in")
    for p in sorted((tmp_path / "in").glob("*.parquet")):
        storage.upload(p, storage.path(f"{s3}/in/{p.name}"))
    scores = tmp_path / "in" / "part-00000.parquet"  # a join table: the first file's hashes and scores
    storage.upload(scores, storage.path(f"{s3}/scores/a.parquet"))
    steps = [{"step": "dedup", "buckets": 4}, "filter",
             {"step": "join", "table": f"{s3}/scores", "columns": ["punsafe"], "on_clash": "replace", "partitions": 4}]
    doc = {"pipelines": {"p": {"input": f"{s3}/in", "output": f"{s3}/out", "steps": steps}}}
    cwd = tmp_path / "driver-cwd"
    cwd.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(PYTHONPATH=str(ROOT), RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_USAGE_STATS_ENABLED="0")
    run = subprocess.run([sys.executable, "-c", DRIVER, json.dumps(doc)], cwd=cwd, env=env, capture_output=True,
                         text=True, timeout=240)
    assert run.returncode == 0, run.stderr[-3000:]
    assert list(cwd.iterdir()) == []
    nodes = Counter()
    for step in ("dedup", "join"):
        for marker in storage.path(f"{s3}/out/{step}/_done").glob("*.json"):
            nodes[json.loads(marker.read_text())["node"]] += 1
    # Both nodes ran tasks. How many each is Ray's choice: its default policy fills the local node
    # first, and the second node's workers start seconds later on this busy machine (seen 20 + 1).
    assert len(nodes) == 2, nodes
    stats = json.loads(storage.path(f"{s3}/out/join/_stats.json").read_text())
    assert stats["rows_in"] == json.loads(storage.path(f"{s3}/out/filter/_stats.json").read_text())["kept"]
    assert stats["matched"] > 0
