"""Shared fixtures: one local Ray for the whole session (2-3 s start, ~1 GB), temp folders."""
from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")


@pytest.fixture(scope="session")
def ray_local():
    """A local Ray with 2 CPUs, started once; tests needing Ray take this fixture."""
    import ray

    from core.ray_util import init_ray

    init_ray(num_cpus=2)
    yield ray
    ray.shutdown()
