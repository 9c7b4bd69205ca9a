"""Shared fixtures: the tiny model, a local Ray cluster, and S3 through moto's server."""

from __future__ import annotations

import json
import os
import socket

import pytest

from raybatch.faults import FOLDER_VARIABLE
from raybatch.service import use_ray_auth
from tests.helpers import Faults, Service, raybatch_cli, service_config, service_up


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
def service(tmp_path_factory, tiny_model, s3_endpoint):
    """`raybatch up` as a user runs it: a local Ray (`ray start`), the Serve app and the
    scheduler, on local storage. Started after the S3 variables and RAYBATCH_FAULTS are
    set so that the cluster's processes inherit them (a restarted cluster too: it is
    started from this process's environment). `raybatch down` at the end."""
    home = tmp_path_factory.mktemp("raybatch-home")
    os.environ[FOLDER_VARIABLE] = str(home / "faults")
    storage = str(home / "storage")
    (home / "service.json").write_text(json.dumps(service_config(storage, tiny_model)))
    state = service_up(str(home), _free_port(), metrics_port=_free_port())
    os.environ["RAY_ADDRESS"] = state["address"]
    # The cluster requires Ray's token: this process (ray.init, the Jobs API client) and
    # every subprocess a test starts find it as a user of the service would.
    use_ray_auth(state["ray_auth_token_path"])
    yield Service(state["base_url"], storage, str(home), state["address"], state["metrics_port"])
    import ray

    ray.shutdown()
    raybatch_cli(str(home), "down", check=False)
    for name in ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH"):
        os.environ.pop(name, None)


@pytest.fixture
def faults(service):
    """Arms faults in every process of the service's cluster; disarms them after the test."""
    armed = Faults(os.environ[FOLDER_VARIABLE])
    armed.clear()
    yield armed
    armed.clear()


@pytest.fixture(scope="session")
def ray_cluster(service):
    """The service's Ray cluster, joined by this test process."""
    from raybatch.runner import ensure_ray

    ensure_ray()
    yield


def pytest_collection_modifyitems(items):
    """Slow tests run last, in their files' order: the cluster restarts and the soak stop
    the session's cluster (and bring it back), which nothing after them should meet."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is not None)
