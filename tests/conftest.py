"""Shared fixtures: the tiny model, a local Ray cluster, and S3 through moto's server."""

from __future__ import annotations

import os
import socket

import pytest


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    from raybatch.tiny_model import build_tiny_model

    return str(build_tiny_model(tmp_path_factory.mktemp("tiny-model"), seed=0))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_endpoint():
    """moto's S3 server on loopback; AWS_* variables point s3fs (and Ray workers) at it."""
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    os.environ.update(
        AWS_ENDPOINT_URL=endpoint,
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing",
        AWS_DEFAULT_REGION="us-east-1",
    )
    yield endpoint
    server.stop()


@pytest.fixture(scope="session")
def ray_cluster(s3_endpoint):
    """One local Ray for the session, started after the S3 variables are set so that
    its workers inherit them."""
    import ray

    from raybatch.runner import ensure_ray

    os.environ.pop("RAY_ADDRESS", None)
    ensure_ray(num_cpus=4)
    yield
    ray.shutdown()
