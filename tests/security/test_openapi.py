"""Issue 10, item 9: the API's schema answered anyone. It now needs a valid key, and
the interactive docs pages do not exist."""

from __future__ import annotations

import httpx


def test_openapi_needs_a_valid_key_and_docs_pages_are_off(service):
    url = f"{service.base_url}/openapi.json"
    for headers in ({}, {"Authorization": "Bearer nonsense"}):
        reply = httpx.get(url, headers=headers, timeout=60)
        assert reply.status_code == 401 and reply.json()["error"]["status"] == "UNAUTHENTICATED"
        assert "paths" not in reply.text
    reply = httpx.get(url, headers={"Authorization": f"Bearer {service.key('schema-reader')}"}, timeout=60)
    assert reply.status_code == 200 and "/v1/accounts/{account}/datasets" in reply.json()["paths"]
    for page in ("/docs", "/redoc", "/docs/oauth2-redirect"):
        assert httpx.get(f"{service.base_url}{page}", timeout=60).status_code == 404
