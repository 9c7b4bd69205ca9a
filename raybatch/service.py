"""`raybatch up` / `raybatch down`: start the service on a workstation or join a cluster.

`up` starts a local Ray head (`ray start --head`, so the cluster outlives this command)
unless an address is given, deploys the Serve app, waits until the API answers and
prints its base URL. What it started is noted in `~/.raybatch/up.json`
(`RAYBATCH_HOME` moves it) so that `down` stops exactly that.

A Ray that `up` starts always has token authentication on (`RAY_AUTH_MODE=token`): GCS,
the Ray client and the dashboard (its Jobs API runs any code) refuse whoever lacks the
token. The token is made once, at `ray-auth-token` in the service's home, mode 0600;
every process `up` starts inherits `RAY_AUTH_TOKEN_PATH` pointing at it, and any other
process that joins the cluster needs the same two variables (`ray_auth_env`). Without
them Ray 2.60 turns auth on at `ray start` only if some token file already exists, so a
fresh host would run a cluster that takes anyone's code.

With `tls_cert` and `tls_key` the API is served over HTTPS (Serve's proxy runs uvicorn
with them) and the base URL is https://. Without them it is plain HTTP, and API keys
cross the network in clear text: fine on loopback, not past it.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import ssl
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Optional

from raybatch.config import ServiceConfig
from raybatch.exceptions import ConfigError

APP_NAME = "raybatch"


def home() -> Path:
    return Path(os.environ.get("RAYBATCH_HOME") or os.path.expanduser("~/.raybatch"))


def ray_token_path() -> Path:
    return home() / "ray-auth-token"


def ray_auth_env(create: bool = False) -> dict[str, str]:
    """The variables with which a process uses the service's Ray token: Ray reads the
    token from RAY_AUTH_TOKEN_PATH, and RAY_AUTH_MODE=token makes it require one (a
    client given an explicit address does not turn auth on by itself). `create` makes
    the token first if there is none: 32 random bytes, hex, in a file only its owner
    can read (created 0600, never widened, so no other user sees it even briefly)."""
    path = ray_token_path()
    if create and not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "w") as token_file:
            token_file.write(secrets.token_hex(32))
    return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(path)}


def use_ray_auth(token_path: str) -> None:
    """Make this process and those it starts use token auth with the token at
    `token_path`. Ray reads its auth settings once and caches them; if it is already
    imported they are re-read, as Ray does itself when it turns auth on
    (ray._private.authentication.authentication_token_setup._enable_token_auth)."""
    os.environ.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token_path))
    if "ray" in sys.modules:
        from ray._raylet import AuthenticationTokenLoader, Config

        Config.initialize("")
        AuthenticationTokenLoader.instance().reset_cache()


def _ray_command() -> str:
    beside = Path(sys.executable).with_name("ray")
    return str(beside) if beside.exists() else (shutil.which("ray") or "ray")


def wait_until_answering(base_url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    # Only whether our own server answers, on this host: its certificate need not name
    # the address asked here (127.0.0.1 for 0.0.0.0), so it is not checked.
    context = ssl._create_unverified_context() if base_url.startswith("https:") else None
    while True:
        try:
            with urllib.request.urlopen(f"{base_url}/healthz", timeout=5, context=context) as reply:
                if reply.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"the API at {base_url} did not answer within {timeout:g}s")
        time.sleep(0.5)


def http_options(host: str, port: int, tls_cert: Optional[str] = None, tls_key: Optional[str] = None) -> dict:
    """Serve's HTTPOptions: HTTPS when given a certificate (PEM, chain included) and its
    key, both or neither. The paths are made absolute and checked here, because Serve's
    proxy opens them in its own process and reports a bad one only in its log."""
    if bool(tls_cert) != bool(tls_key):
        raise ConfigError("give both --tls-cert and --tls-key, or neither")
    options: dict = {"host": host, "port": port}
    if tls_cert and tls_key:
        for flag, path in (("--tls-cert", tls_cert), ("--tls-key", tls_key)):
            if not os.access(path, os.R_OK):
                raise ConfigError(f"{flag} {path}: not a readable file")
        options.update(ssl_certfile=os.path.abspath(tls_cert), ssl_keyfile=os.path.abspath(tls_key))
    return options


def deploy(config: ServiceConfig, host: str, port: int, tls_cert: Optional[str] = None,
           tls_key: Optional[str] = None) -> None:
    """Deploy (or redeploy) the Serve app on the connected cluster. The HTTP options
    take effect only where this starts Serve: a running Serve keeps its own."""
    from ray import serve

    from raybatch.api.app import build_app

    serve.start(http_options=http_options(host, port, tls_cert, tls_key))
    serve.run(build_app(config.model_dump()), name=APP_NAME, route_prefix="/", blocking=False)


def up(
    config: ServiceConfig,
    port: int = 8000,
    address: Optional[str] = None,
    host: str = "127.0.0.1",
    num_cpus: Optional[int] = None,
    timeout: float = 300.0,
    tls_cert: Optional[str] = None,
    tls_key: Optional[str] = None,
    metrics_port: Optional[int] = None,
) -> str:
    http_options(host, port, tls_cert, tls_key)  # a bad TLS flag fails before Ray starts
    address = address or os.environ.get("RAY_ADDRESS")
    started_ray = address is None
    if metrics_port and not started_ray:
        raise ConfigError("--metrics-port sets the metrics port of a Ray that `up` starts; a cluster "
                          "it joins has its own (`ray start --metrics-export-port`)")
    # What the cluster's processes create (records, data, logs) is the service user's
    # only; storage.py also sets its modes itself, whatever the umask.
    os.umask(0o077)
    if started_ray:
        # Set before Ray is used here, inherited by `ray start` and so by every raylet,
        # worker, Serve replica, scheduler and job driver of the cluster.
        use_ray_auth(ray_auth_env(create=True)["RAY_AUTH_TOKEN_PATH"])
        # The dashboard (Jobs API) listens on loopback only. GCS and the raylets listen
        # on every interface whatever is asked (Ray 2.60 replaces a loopback
        # --node-ip-address by the node's address); the token is what guards them.
        command = [_ray_command(), "start", "--head", "--disable-usage-stats", "--dashboard-host", "127.0.0.1",
                   f"--num-cpus={num_cpus or max(4, os.cpu_count() or 1)}"]
        if metrics_port:  # Prometheus scrapes 127.0.0.1:PORT/metrics (docs/deploy.md, "Metrics")
            command.append(f"--metrics-export-port={metrics_port}")
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            raise ConfigError(f"ray start failed (is a Ray cluster already running here?):\n{done.stderr[-2000:]}")
        address = "auto"
    import ray

    ray.init(address=address, log_to_driver=False)
    try:
        deploy(config, host, port, tls_cert, tls_key)
        scheme = "https" if tls_cert else "http"
        base_url = f"{scheme}://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}"
        wait_until_answering(base_url, timeout)
        # A Ray we started is this machine's own: "auto" finds it (its recorded GCS
        # address can refuse connections made by address on some hosts).
        joined = "auto" if started_ray else ray.get_runtime_context().gcs_address
        state = {"base_url": base_url, "address": joined,
                 "started_ray": started_ray, "storage": config.storage, "metrics_port": metrics_port,
                 "ray_auth_token_path": str(ray_token_path()) if started_ray else None}
    finally:
        ray.shutdown()
    home().mkdir(parents=True, exist_ok=True)
    (home() / "up.json").write_text(json.dumps(state, indent=2))
    return base_url


def down() -> str:
    """Stop what `up` started: the whole local Ray it started, or else the Serve app and
    the scheduler on the cluster it joined (running job drivers go on; the next `up`
    picks them up)."""
    import ray

    state_file = home() / "up.json"
    if not state_file.exists():
        raise ConfigError(f"nothing to stop: no {state_file} (was `raybatch up` run?)")
    state = json.loads(state_file.read_text())
    if state["started_ray"]:
        subprocess.run([_ray_command(), "stop", "--force"], capture_output=True, text=True)
    else:
        from ray import serve

        from raybatch.jobs.scheduler import NAMESPACE, scheduler_name

        ray.init(address=state["address"], log_to_driver=False)
        try:
            serve.delete(APP_NAME)
            try:
                ray.kill(ray.get_actor(scheduler_name(state["storage"]), namespace=NAMESPACE))
            except ValueError:
                pass
        finally:
            ray.shutdown()
    state_file.unlink()
    return state["base_url"]
