"""Shared fixtures: the tiny model, a local Ray cluster, and S3 through moto's server."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from dataclasses import dataclass

import pytest

from raybatch.faults import FOLDER_VARIABLE
from raybatch.service import use_ray_auth
from tests.helpers import Faults


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
    # The real engine: vLLM CPU on the tiny model (eager: starts in ~25 s, not ~70 s),
    # kept warm from service start, as an operator would keep a busy model.
    "tiny": {"source": "{tiny}", "engine": {"min_replicas": 1, "engine_args": {"enforce_eager": True}}},
    # The deterministic test engine, one row at a time, so a job takes a known time.
    "scripted-slow": {
        "source": "scripted",
        "engine": {"kind": "scripted", "batch_size": 1, "concurrent_batches": 1,
                   "engine_args": {"seconds_per_request": 1.0}},
    },
    "scripted": {"source": "scripted", "engine": {"kind": "scripted"}},
    # A catalog entry whose files are missing: the job fails at VALIDATING, saying so.
    "no-files": {"source": "/nowhere/model"},
    # Slow, and recording every call under {home}/calls (the cluster-restart test).
    "scripted-counted": {
        "source": "scripted",
        "engine": {"kind": "scripted", "batch_size": 1, "concurrent_batches": 1,
                   "engine_args": {"seconds_per_request": 0.5, "invocations_dir": "{home}/calls"}},
    },
}
# Shared by several jobs at once (test_engine_pool.py): a replica takes 3 rows at a time
# (1.25 x max_num_seqs 2), each job keeps 6 at the pool, so rows of different jobs
# compete for the same slots; every call recorded under {home}/pool-calls.
# "scripted-fair" has no short hang timeout: its test holds requests at a gate.
# Its rows also take longer (0.5 s), so that every job's pipeline keeps rows waiting at
# the pool (the pool can only share out rows that are there).
for _name, _replicas, _timeout, _seconds in (
    ("scripted-shared-1", 1, 3, 0.1), ("scripted-shared-2", 2, 3, 0.1), ("scripted-fair", 1, 600, 0.5),
):
    SERVICE_MODELS[_name] = {
        "source": "scripted",
        "engine": {"kind": "scripted", "replicas": _replicas, "max_num_seqs": 2, "batch_size": 1,
                   "concurrent_batches": 6, "request_timeout_seconds": _timeout,
                   "engine_args": {"seconds_per_request": _seconds, "invocations_dir": "{home}/pool-calls"}},
    }
for _name, _entry in list(SERVICE_MODELS.items()):
    if _entry.get("engine", {}).get("kind") == "scripted":
        _entry["engine"]["replica_cpus"] = 0
# The soak's engines (test_soak.py): recording every call, with a short request
# timeout so that an armed hang is caught in seconds; one replica and two.
for _replicas in (1, 2):
    SERVICE_MODELS[f"scripted-soak-{_replicas}"] = {
        "source": "scripted",
        "engine": {"kind": "scripted", "replica_cpus": 0, "replicas": _replicas, "batch_size": 2, "concurrent_batches": 1,
                   "request_timeout_seconds": 3,
                   "engine_args": {"seconds_per_request": 0.25, "invocations_dir": "{home}/calls"}},
    }


CLI = [sys.executable, "-m", "raybatch.cli"]


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

    def stop(self, how: str) -> None:
        """Stop the whole Ray cluster: "raybatch down" or "ray stop --force". This
        process leaves it first."""
        import ray

        ray.shutdown()
        if how == "raybatch down":
            _raybatch(self.home, "down")
        else:
            ray_cli = os.path.join(os.path.dirname(sys.executable), "ray")
            subprocess.run([ray_cli, "stop", "--force"], capture_output=True, timeout=120)

    def start(self) -> None:
        """`raybatch up` again, on the same port with the same config."""
        _up(self.home, int(self.base_url.rsplit(":", 1)[1]))


def _raybatch(home: str, *args: str, check: bool = True) -> str:
    env = {**os.environ, "RAYBATCH_HOME": home}
    env.pop("RAY_ADDRESS", None)
    done = subprocess.run([*CLI, *args], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 or not check, done.stderr[-3000:]
    return done.stdout


def _up(home: str, port: int) -> dict:
    stdout = _raybatch(home, "up", "--port", str(port), "--config", os.path.join(home, "service.json"), "--num-cpus", "4")
    with open(os.path.join(home, "up.json")) as up:
        state = json.load(up)
    assert stdout.strip().splitlines()[-1] == state["base_url"]
    return state


def service_config(storage: str, tiny_model: str) -> dict:
    home = os.path.dirname(storage)
    models = json.loads(json.dumps(SERVICE_MODELS).replace("{tiny}", tiny_model).replace("{home}", home))
    return {
        "storage": storage,
        "models": models,
        "progress_interval_seconds": 1,
        # tests/security: an account that may use only part of the catalog.
        "account_models": {"catalog-restricted": ["scripted"]},
        # Scripted replicas need no CPU of their own; idle ones go after 20 s, so the
        # session's many scripted models do not pile up.
        "run_defaults": {"part_max_seconds": 1, "engine": {"idle_seconds": 20}},
        "admin_accounts": ["admin"],
    }


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
    state = _up(str(home), _free_port())
    os.environ["RAY_ADDRESS"] = state["address"]
    # The cluster requires Ray's token: this process (ray.init, the Jobs API client) and
    # every subprocess a test starts find it as a user of the service would.
    use_ray_auth(state["ray_auth_token_path"])
    yield Service(state["base_url"], storage, str(home), state["address"])
    import ray

    ray.shutdown()
    _raybatch(str(home), "down", check=False)
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
