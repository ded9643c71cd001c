"""Ray start-up: a local in-process cluster by default, a real cluster by address.

`--ray-address` or RAY_ADDRESS joins a cluster; under `ray job submit` Ray sets RAY_ADDRESS
itself. Without either, Ray starts locally with `address="local"` (a plain `ray.init()` can
retry forever on a stale `ray_current_cluster` file) and stays on loopback.
"""
from __future__ import annotations

import os

# Keep a local Ray on loopback and quiet (see shared/ENVIRONMENT.md); a user's own setting wins.
_ENV_DEFAULTS = {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "1",
}


def init_ray(address: str | None = None, num_cpus: int | None = None) -> str:
    """Start or join Ray once per process; returns the address kind used ("local" or the address)."""
    for k, v in _ENV_DEFAULTS.items():
        os.environ.setdefault(k, v)
    import ray

    if ray.is_initialized():
        return "existing"
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address:
        ray.init(address=address, log_to_driver=True)
        return address
    ray.init(address="local", include_dashboard=False, num_cpus=num_cpus, log_to_driver=True)
    return "local"


def cluster_cpus() -> int:
    import ray

    return max(1, int(ray.cluster_resources().get("CPU", 1)))


def cluster_gpus() -> int:
    import ray

    return int(ray.cluster_resources().get("GPU", 0))
