"""Ray start-up: a local in-process cluster by default, a real cluster by address.

`--ray-address` or RAY_ADDRESS joins a cluster; under `ray job submit` Ray sets RAY_ADDRESS
itself. Without either, Ray starts locally with `address="local"` (a plain `ray.init()` can
retry forever on a stale `ray_current_cluster` file) and stays on loopback.
"""
from __future__ import annotations

import atexit
import logging
import os

# Keep a local Ray on loopback and quiet (see shared/ENVIRONMENT.md); a user's own setting wins.
_ENV_DEFAULTS = {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "1",
}


_JOINED: list[str] = []  # the cluster address this process joined, if it joined one


def init_ray(address: str | None = None, num_cpus: int | None = None) -> str:
    """Start or join Ray once per process; returns the address kind used ("local" or the address).
    Commands resolve `address` with `core.cli.ray_address`; a step that needs Ray and finds
    none calls this with no address and gets a local Ray."""
    for k, v in _ENV_DEFAULTS.items():
        os.environ.setdefault(k, v)
    import ray

    if ray.is_initialized():
        return "existing"
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address:
        ray.init(address=address, log_to_driver=True)
        _JOINED.append(address)
        return address
    _quiet_token_notice()
    # Ray's driver-side INFO lines ("Started a local Ray instance.") say nothing the command does not
    # say itself; warnings and errors still show. RAY_LOGGING_LEVEL, when a user sets it, wins.
    quiet = {} if "RAY_LOGGING_LEVEL" in os.environ else {"logging_level": logging.WARNING}
    ray.init(address="local", include_dashboard=False, num_cpus=num_cpus, log_to_driver=True, **quiet)
    atexit.register(shutdown_local)  # runs before Ray's own exit hook (atexit is last-in, first-out)
    return "local"


def shutdown_local() -> None:
    """Stop the local Ray this process started, without Ray's one-second stall.

    Ray stops its node processes one by one, each with SIGTERM and up to 1 s to exit. Its
    autoscaler monitor always takes the whole second: on SIGTERM it reports its own end to the
    GCS, which was stopped just before (measured: monitor 1.02 s, raylet 0.03 s, GCS 0.02 s). A
    local single-node cluster has nothing to autoscale, so the monitor is killed outright
    first; then Ray's normal shutdown. If Ray's internals move, only the normal shutdown runs."""
    import ray

    if not ray.is_initialized():
        return
    try:
        node = ray._private.worker._global_node
        for info in node.all_processes.get("monitor", []) if node is not None and node.is_head() else []:
            info.process.kill()
            info.process.wait(timeout=1)
    except Exception:  # noqa: BLE001 - private API: fall back to the plain shutdown below
        pass
    ray.shutdown()


class _DropTokenNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Token authentication is enabled for this Ray cluster")


def _quiet_token_notice() -> None:
    """A local Ray keeps Ray's default, token authentication (its processes listen on
    loopback only, and a token keeps other local users out); the notice Ray prints about that
    default at every start says nothing a user must act on, so it is dropped. Ray's other
    messages, and its warning when authentication is *disabled*, still show."""
    logger = logging.getLogger("ray._private.authentication.authentication_token_setup")
    if not any(isinstance(f, _DropTokenNotice) for f in logger.filters):
        logger.addFilter(_DropTokenNotice())


def joined_address() -> str | None:
    """The address of the Ray cluster this process joined (None: no Ray, or a local one)."""
    return _JOINED[-1] if _JOINED else None


def cluster_cpus() -> int:
    import ray

    return max(1, int(ray.cluster_resources().get("CPU", 1)))


def cluster_gpus() -> int:
    import ray

    return int(ray.cluster_resources().get("GPU", 0))
