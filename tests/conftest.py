"""Shared fixtures: one local Ray for the whole session (2-3 s start, ~1 GB), temp folders,
and a real S3 API (moto's server) on loopback for the object-storage tests."""
from __future__ import annotations

import os
import socket
import uuid

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# The S3 endpoint is fixed before anything starts, so every process of the session (Ray's
# workers, a test's subprocesses, a 2-node test cluster) finds it as it would find real S3:
# through the standard AWS variables only. The server itself starts when a test asks for it.
S3_PORT = _free_port()
S3_BUCKET = "tessera-test"
for _k, _v in {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{S3_PORT}", "AWS_ACCESS_KEY_ID": "testing",
               "AWS_SECRET_ACCESS_KEY": "testing", "AWS_REGION": "us-east-1"}.items():
    os.environ[_k] = _v


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 server on 127.0.0.1:S3_PORT with the bucket S3_BUCKET."""
    import logging

    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=S3_PORT, verbose=False)
    server.start()
    boto3.client("s3").create_bucket(Bucket=S3_BUCKET)
    yield f"s3://{S3_BUCKET}"
    server.stop()


@pytest.fixture
def s3(s3_server) -> str:
    """A fresh prefix in the test bucket: `s3://tessera-test/<random>`."""
    return f"{s3_server}/{uuid.uuid4().hex[:12]}"


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
