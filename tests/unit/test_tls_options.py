"""Issue 10, item 10 without a cluster: what `raybatch up --tls-cert/--tls-key` hands
to Serve, and the flags refused before anything starts. The HTTPS service itself is
tests/security/test_tls.py."""

from __future__ import annotations

import threading

import pytest
import uvicorn
from ray.serve.config import HTTPOptions

from raybatch import cli, service
from raybatch.config import ServiceConfig
from raybatch.exceptions import ConfigError
from tests.certificates import self_signed_cert


def test_a_certificate_and_key_become_serves_ssl_options(tmp_path, monkeypatch):
    cert, key = self_signed_cert(tmp_path / "tls")
    monkeypatch.chdir(tmp_path)
    options = service.http_options("0.0.0.0", 8443, "tls/cert.pem", "tls/key.pem")
    # Absolute: Serve's proxy opens them from its own working directory.
    assert options == {"host": "0.0.0.0", "port": 8443, "ssl_certfile": cert, "ssl_keyfile": key}
    assert HTTPOptions(**options).ssl_certfile == cert
    assert service.http_options("127.0.0.1", 8000) == {"host": "127.0.0.1", "port": 8000}


@pytest.mark.parametrize("cert, key, message", [
    ("cert.pem", None, "give both --tls-cert and --tls-key"),
    (None, "key.pem", "give both --tls-cert and --tls-key"),
    ("cert.pem", "missing.pem", "--tls-key missing.pem: not a readable file"),
])
def test_bad_tls_flags_are_refused_before_ray_starts(tmp_path, monkeypatch, cert, key, message):
    self_signed_cert(tmp_path)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(service.subprocess, "run", lambda *a, **k: pytest.fail("ray start was run"))
    with pytest.raises(ConfigError, match=message):
        service.up(ServiceConfig(storage=str(tmp_path / "storage")), tls_cert=cert, tls_key=key)


def test_deploy_starts_serve_with_the_tls_options(tmp_path, monkeypatch):
    from ray import serve

    cert, key = self_signed_cert(tmp_path)
    started = {}
    monkeypatch.setattr(serve, "start", lambda **kwargs: started.update(kwargs))
    monkeypatch.setattr(serve, "run", lambda *args, **kwargs: None)
    service.deploy(ServiceConfig(storage=str(tmp_path / "storage")), "0.0.0.0", 8443, cert, key)
    assert started["http_options"] == {"host": "0.0.0.0", "port": 8443, "ssl_certfile": cert, "ssl_keyfile": key}


def test_the_cli_flags_reach_up_and_the_base_url_is_https(tmp_path, monkeypatch, capsys):
    seen = {}

    def fake_up(config, **kwargs):
        seen.update(kwargs)
        return f"https://127.0.0.1:{kwargs['port']}"

    monkeypatch.setattr(service, "up", fake_up)
    assert cli.main(["up", "--storage", str(tmp_path), "--port", "8443", "--tls-cert", "c.pem", "--tls-key", "k.pem"]) == 0
    assert seen["tls_cert"] == "c.pem" and seen["tls_key"] == "k.pem"
    assert capsys.readouterr().out.strip() == "https://127.0.0.1:8443"


def test_waiting_for_an_https_api_accepts_its_own_certificate(tmp_path):
    """`up` waits for /healthz over HTTPS whatever names the certificate holds."""
    cert, key = self_signed_cert(tmp_path)

    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, ssl_certfile=cert, ssl_keyfile=key,
                                           log_level="error", lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        while not server.started:
            threading.Event().wait(0.05)
        port = server.servers[0].sockets[0].getsockname()[1]
        service.wait_until_answering(f"https://127.0.0.1:{port}", timeout=10)
        with pytest.raises(TimeoutError):  # plain HTTP to a TLS port gets no answer
            service.wait_until_answering(f"http://127.0.0.1:{port}", timeout=1)
    finally:
        server.should_exit = True
        thread.join(10)
