"""Shared fixtures: the tiny model, a local Ray cluster, and S3 through moto's server."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from dataclasses import dataclass

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


SERVICE_MODELS = {
    # The real engine: vLLM CPU on the tiny model (eager: starts in ~25 s, not ~70 s).
    "tiny": {"source": "{tiny}", "engine": {"engine_args": {"enforce_eager": True}}},
    # The deterministic test engine, one row at a time, so a job takes a known time.
    "scripted-slow": {
        "source": "scripted",
        "engine": {"kind": "scripted", "batch_size": 1, "concurrent_batches": 1,
                   "engine_args": {"seconds_per_request": 1.0}},
    },
    "scripted": {"source": "scripted", "engine": {"kind": "scripted"}},
    # Slow, and recording every call under {home}/calls (the cluster-restart test).
    "scripted-counted": {
        "source": "scripted",
        "engine": {"kind": "scripted", "batch_size": 1, "concurrent_batches": 1,
                   "engine_args": {"seconds_per_request": 0.5, "invocations_dir": "{home}/calls"}},
    },
}


@dataclass
class Service:
    base_url: str
    storage: str
    home: str
    address: str

    def key(self, account: str) -> str:
        from raybatch.api.auth import create_key
        from raybatch.store import Store

        return create_key(Store(self.storage), account)[0]


def service_config(storage: str, tiny_model: str) -> dict:
    home = os.path.dirname(storage)
    models = json.loads(json.dumps(SERVICE_MODELS).replace("{tiny}", tiny_model).replace("{home}", home))
    return {
        "storage": storage,
        "models": models,
        "progress_interval_seconds": 1,
        "run_defaults": {"part_max_seconds": 1},
    }


@pytest.fixture(scope="session")
def service(tmp_path_factory, tiny_model, s3_endpoint):
    """`raybatch up` as a user runs it: a local Ray (`ray start`), the Serve app and the
    scheduler, on local storage. Started after the S3 variables are set so that the
    cluster's processes inherit them. `raybatch down` at the end."""
    home = tmp_path_factory.mktemp("raybatch-home")
    storage = str(home / "storage")
    config_file = home / "service.json"
    config_file.write_text(json.dumps(service_config(storage, tiny_model)))
    env = {**os.environ, "RAYBATCH_HOME": str(home)}
    env.pop("RAY_ADDRESS", None)
    cli = [sys.executable, "-m", "raybatch.cli"]
    started = subprocess.run(
        [*cli, "up", "--port", str(_free_port()), "--config", str(config_file), "--num-cpus", "4"],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert started.returncode == 0, started.stderr[-3000:]
    state = json.loads((home / "up.json").read_text())
    assert started.stdout.strip().splitlines()[-1] == state["base_url"]
    os.environ["RAY_ADDRESS"] = state["address"]
    yield Service(state["base_url"], storage, str(home), state["address"])
    import ray

    ray.shutdown()
    subprocess.run([*cli, "down"], env=env, capture_output=True, timeout=120)
    os.environ.pop("RAY_ADDRESS", None)


@pytest.fixture(scope="session")
def ray_cluster(service):
    """The service's Ray cluster, joined by this test process."""
    from raybatch.runner import ensure_ray

    ensure_ray()
    yield
