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


@pytest.fixture
def one_torch_thread():
    """Run torch on one intra-op thread, then restore. Tiny models gain nothing from more, and
    on a busy 2-core machine OpenMP threads spin: a 0.13 s forward was seen to take 9 s."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
