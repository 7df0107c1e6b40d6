"""Shared fixtures: a small source tree, a config rooted in tmp_path, a real S3 server, a real Prefect API.

Everything here is real: moto's ThreadedMotoServer is an S3-compatible HTTP server on 127.0.0.1 that
s3fs talks to over the network exactly as it would to MinIO; `prefect_test_harness` runs a real
Prefect server on a temporary SQLite database.
"""

from __future__ import annotations

import os
import socket
import textwrap
from pathlib import Path

import pytest

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

GOOD_MODULE = textwrap.dedent(
    '''
    """A small module with a few functions."""

    import math


    def area(radius: float) -> float:
        """Area of a circle."""
        return math.pi * radius ** 2


    def perimeter(radius: float) -> float:
        return 2 * math.pi * radius


    class Counter:
        def __init__(self):
            self.count = 0

        def tick(self, step: int = 1) -> int:
            self.count += step
            return self.count
    '''
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def cfg(tmp_path):
    """A run config writing under tmp_path, shards in threads (tests start no worker processes)."""
    from synth_core.config import RunConfig

    c = RunConfig()
    c.storage.root = str(tmp_path / "data")
    c.execution.task_runner = "threads"
    return c


@pytest.fixture
def source_tree(tmp_path) -> Path:
    """A folder with one good module."""
    root = tmp_path / "src"
    root.mkdir()
    (root / "good.py").write_text(GOOD_MODULE)
    return root


@pytest.fixture(scope="session")
def s3_endpoint():
    """A real S3-compatible server (moto) on 127.0.0.1 with bucket 'scoder'."""
    import boto3
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    env = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="scoder")
    yield endpoint
    server.stop()
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="session")
def prefect_api():
    """A real Prefect API (temporary server + SQLite) for the whole session."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=60):
        yield
