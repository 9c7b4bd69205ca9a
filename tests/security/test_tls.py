"""Issue 10, item 10: `raybatch up --tls-cert --tls-key` serves the API over HTTPS.

The session's service is stopped (`raybatch down`), started again with a self-signed
certificate made here, used over HTTPS by the Fireworks SDK and by httpx with that
certificate as their CA, and refused to plain HTTP and to clients that do not trust the
certificate; then it is started again as it was. Marked slow so that it runs last, as
the cluster restarts do (only one Ray cluster can run on the machine)."""

from __future__ import annotations

import os

import httpx
import pytest

from tests.certificates import self_signed_cert
from tests.helpers import raybatch_cli

pytestmark = pytest.mark.slow

ACCOUNT = "tls"
LINE = b'{"custom_id": "a", "body": {"messages": [{"role": "user", "content": "hi"}]}}\n'


@pytest.fixture
def https_service(service, tmp_path):
    """The session's service, on its own port and storage, over HTTPS; yields
    (base_url, certificate). Plain HTTP again afterwards."""
    cert, key = self_signed_cert(tmp_path / "tls")
    port = service.base_url.rsplit(":", 1)[1]
    service.stop("raybatch down")
    try:
        stdout = raybatch_cli(service.home, "up", "--port", port, "--config", os.path.join(service.home, "service.json"),
                              "--num-cpus", "4", "--tls-cert", cert, "--tls-key", key)
        base_url = stdout.strip().splitlines()[-1]
        yield base_url, cert
    finally:
        raybatch_cli(service.home, "down", check=False)
        service.start()


def test_the_api_is_served_over_https_only(service, https_service):
    from fireworks import Fireworks

    base_url, cert = https_service
    port = service.base_url.rsplit(":", 1)[1]
    assert base_url == f"https://127.0.0.1:{port}"
    key = service.key(ACCOUNT)

    # The SDK, trusting the certificate: a dataset made, uploaded and read over HTTPS.
    with httpx.Client(verify=cert, timeout=60) as trusting:
        client = Fireworks(api_key=key, account_id=ACCOUNT, base_url=base_url, max_retries=0, http_client=trusting)
        client.datasets.create(dataset_id="over-tls", dataset={"user_uploaded": {}})
        client.datasets.upload("over-tls", file=("in.jsonl", LINE * 3))
        assert client.datasets.get("over-tls").example_count == "3"
        # Signed URLs the service makes are https:// too, and work.
        reply = trusting.get(f"{base_url}/v1/accounts/{ACCOUNT}/datasets/over-tls:getDownloadEndpoint",
                              headers={"Authorization": f"Bearer {key}"})
        urls = reply.json()["filenameToSignedUrls"]
        assert all(url.startswith(f"{base_url}/v1/signed/") for url in urls.values()), urls
        assert trusting.get(urls["in.jsonl"]).content == LINE * 3

    # Plain HTTP on the same port gets no answer (a TLS server sees no handshake).
    with pytest.raises(httpx.TransportError):
        httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=10)
    # A client that does not trust the certificate refuses the connection itself.
    with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
        httpx.get(f"{base_url}/healthz", timeout=10)
