"""Issue 10, item 2: the Ray cluster `raybatch up` starts takes no one's code without its
token. Attacks on the real cluster of the session's service: the dashboard's Jobs API
over HTTP, and Ray clients, each in a process that lacks the token."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys

import httpx
import pytest
import ray

CLIENT = "import ray, sys; ray.init(address=sys.argv[1]); print('JOINED', ray.cluster_resources().get('CPU'))"


@pytest.fixture(scope="module")
def cluster(service, ray_cluster):
    with open(os.path.join(service.home, "up.json")) as up:
        token_path = json.load(up)["ray_auth_token_path"]
    dashboard = "http://" + ray._private.worker.get_dashboard_url()
    return token_path, dashboard, ray.get_runtime_context().gcs_address


def _outsider_env(tmp_path, **extra) -> dict:
    """A process of someone on the host without the token: no RAY_AUTH_* variables and a
    home of its own (no ~/.ray/auth_token either)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH") and k != "RAY_ADDRESS"}
    env["HOME"] = str(tmp_path)
    return {**env, **extra}


def test_the_token_lives_in_the_service_home_readable_by_its_owner_only(service, cluster):
    token_path, _, _ = cluster
    assert os.path.dirname(token_path) == service.home
    assert stat.S_IMODE(os.stat(token_path).st_mode) == 0o600
    assert len(open(token_path).read().strip()) == 64


def test_the_jobs_api_refuses_requests_without_the_token(cluster, tmp_path):
    token_path, dashboard, _ = cluster
    marker = tmp_path / "pwned"
    attack = {"entrypoint": f"touch {marker}"}
    assert httpx.get(f"{dashboard}/api/jobs/", timeout=30).status_code == 401
    assert httpx.post(f"{dashboard}/api/jobs/", json=attack, timeout=30).status_code == 401
    wrong = {"Authorization": "Bearer " + "0" * 64}
    assert httpx.get(f"{dashboard}/api/jobs/", headers=wrong, timeout=30).status_code == 403
    assert httpx.post(f"{dashboard}/api/jobs/", json=attack, headers=wrong, timeout=30).status_code == 403
    assert not marker.exists()
    # With the token it answers: the refusals above are auth, not a dead dashboard.
    right = {"Authorization": "Bearer " + open(token_path).read().strip()}
    listed = httpx.get(f"{dashboard}/api/jobs/", headers=right, timeout=30)
    assert listed.status_code == 200 and isinstance(listed.json(), list)


def test_the_dashboard_listens_on_loopback_only(cluster):
    """GCS listens on the node's address (Ray 2.60 cannot keep it on loopback; the token
    guards it, see the client tests below); the dashboard does not answer there."""
    _, dashboard, gcs = cluster
    assert dashboard.startswith("http://127.0.0.1:")
    node_ip, port = gcs.rsplit(":", 1)[0], dashboard.rsplit(":", 1)[1]
    if node_ip not in ("127.0.0.1", "localhost"):
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"http://{node_ip}:{port}/api/jobs/", timeout=10)


@pytest.mark.parametrize("address", ["auto", "gcs"])
def test_a_ray_client_without_the_token_is_refused(cluster, tmp_path, address):
    token_path, _, gcs = cluster
    target = gcs if address == "gcs" else "auto"
    refused = subprocess.run([sys.executable, "-c", CLIENT, target], env=_outsider_env(tmp_path),
                             capture_output=True, text=True, timeout=180)
    assert refused.returncode != 0 and "JOINED" not in refused.stdout
    assert "auth" in refused.stderr.lower(), refused.stderr[-2000:]
    joined = subprocess.run(
        [sys.executable, "-c", CLIENT, target],
        env=_outsider_env(tmp_path, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=token_path),
        capture_output=True, text=True, timeout=180,
    )
    assert joined.returncode == 0 and "JOINED" in joined.stdout, joined.stderr[-2000:]
