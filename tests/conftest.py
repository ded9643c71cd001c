"""Shared fixtures: one local Ray for the whole session (2-3 s start, ~1 GB), temp folders,
and a real S3 API (moto's server) on loopback for the object-storage tests."""
from __future__ import annotations

import os
import socket
import uuid

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
# `make test` runs two xdist workers on a 2-core box. Torch in each (the worker, the commands
# it starts, their Ray actors) would start an OpenMP thread per core, and the two workers'
# threads spin against each other: one thread each took tests/train from 314 to 271 CPU s
# (161 -> 140 s). Tests that want more threads set them explicitly.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")


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


# `make test` runs the suite on 2 pytest-xdist workers, a whole file per worker at a time, in
# collection order (--dist loadfile --no-loadscope-reorder). The longest files go first so the
# short ones fill in around them; otherwise the fault-injection files, a few tests each but
# two thirds of the suite's time (1,274 of 1,910 test-seconds), start last and run side by side.
EARLY = ("tests/faults/test_image_faults.py", "tests/faults/test_download_faults.py",
         "tests/faults/test_metadata_faults.py", "tests/faults/test_train_faults.py",
         "tests/train/test_trainer.py", "tests/train/test_grad_sync.py",
         "tests/curate/download/test_download.py")


def pytest_collection_modifyitems(config, items):
    rank = {path: i for i, path in enumerate(EARLY)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::")[0], len(EARLY)))  # stable: file order kept


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
