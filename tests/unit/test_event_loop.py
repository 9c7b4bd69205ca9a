"""Issue 10, item 7 without a cluster: the API's async routes do their storage I/O in
the thread pool, so a slow validation or a slow signed PUT does not hold up other
requests. The FastAPI app runs in-process (httpx's ASGI transport, one event loop) with
a replica object built by hand in place of Serve's; storage is slowed on purpose."""

from __future__ import annotations

import asyncio
import inspect
import time

import httpx
import pytest

from raybatch.api import app as app_module
from raybatch.api import body_limit
from raybatch.api.auth import create_key
from raybatch.api.datasets import DatasetService
from raybatch.api.rate_limit import RateLimiter
from raybatch.api.signing import UrlSigner
from raybatch.api.validation import BackgroundValidations
from raybatch.config import ServiceConfig
from raybatch.resources import DatasetFields
from raybatch.store import Store

LINE = b'{"custom_id": "a", "body": {"messages": [{"role": "user", "content": "hi"}]}}\n'
SLOW = 1.5  # seconds a slowed storage call takes
QUICK = 0.5  # what another request may take meanwhile (it takes milliseconds)


def _servable_dependency():
    """The dependency through which Serve hands each route its replica object."""
    for route in app_module.api.routes:
        endpoint = getattr(route, "endpoint", None)
        if getattr(endpoint, "_serve_cls", None) is not None:
            return inspect.signature(endpoint).parameters["self"].default.dependency
    raise AssertionError("no class-based route found")


@pytest.fixture
def world(tmp_path):
    store = Store(str(tmp_path / "storage"))
    config = ServiceConfig(storage=store.root_url, validation_wait_seconds=5)  # waits out SLOW
    # The class as written (Serve's wrapper subclass adds an ASGI server we do not start).
    written = next(c for c in app_module.RaybatchApi.func_or_class.__mro__ if "_caller" in vars(c))
    replica = object.__new__(written)
    replica.config = body_limit.SETTINGS["config"] = config
    replica.store = store
    replica.datasets = DatasetService(store, config)
    replica.validations = BackgroundValidations(store, replica.datasets, config)
    replica.signer = UrlSigner(store, 60)
    replica.rate_limiter = RateLimiter(config)
    keys = {account: create_key(store, account) for account in ("slow", "other")}
    for account, (_, record) in keys.items():
        replica.datasets.create(account, "d", DatasetFields(), record.key_id)
    dependency = _servable_dependency()
    app_module.api.dependency_overrides[dependency] = lambda: replica
    yield replica, {account: key for account, (key, _) in keys.items()}, keys["slow"][1].key_id
    app_module.api.dependency_overrides.pop(dependency, None)


async def _timed(client: httpx.AsyncClient, method: str, path: str, key: str = "", **kwargs) -> tuple[float, httpx.Response]:
    started = time.monotonic()
    reply = await client.request(method, path, headers={"Authorization": f"Bearer {key}"} if key else {}, **kwargs)
    return time.monotonic() - started, reply


async def _others_while(slow_request, keys: dict) -> tuple[httpx.Response, list[tuple[float, httpx.Response]]]:
    """Start `slow_request(client)`, and while it runs, /healthz and the other account's
    GET; their times and replies."""
    transport = httpx.ASGITransport(app=app_module.api)
    async with httpx.AsyncClient(transport=transport, base_url="http://api") as client:
        slow = asyncio.ensure_future(slow_request(client))
        await asyncio.sleep(0.3)  # the slow request is in its storage call by now
        others = [await _timed(client, "GET", "/healthz"),
                  await _timed(client, "GET", "/v1/accounts/other/datasets/d", keys["other"])]
        assert not slow.done(), "the slow request ended before the others were measured"
        return await slow, others


def test_validate_upload_does_not_hold_up_other_requests(world, monkeypatch):
    replica, keys, key_id = world
    replica.datasets.create("slow", "e", DatasetFields(), key_id)
    replica.store.dataset_files("slow", "e").write_atomic("a.jsonl", LINE)
    validate = replica.datasets.validate

    def slow_validate(account, dataset_id, progress=None):
        time.sleep(SLOW)  # blocking, as reading and expanding 500 MB is
        return validate(account, dataset_id, progress)

    monkeypatch.setattr(replica.datasets, "validate", slow_validate)

    async def validate_upload(client):
        return await client.post("/v1/accounts/slow/datasets/e:validateUpload", json={},
                                 headers={"Authorization": f"Bearer {keys['slow']}"})

    validated, others = asyncio.run(_others_while(validate_upload, keys))
    assert validated.status_code == 200 and validated.json()["state"] == "READY", validated.text
    for seconds, reply in others:
        assert reply.status_code == 200, reply.text
        assert seconds < QUICK, f"{reply.request.url} took {seconds:.2f}s while a validation ran"


def test_a_slow_signed_put_does_not_hold_up_other_requests(world, monkeypatch):
    replica, keys, key_id = world
    body = LINE * ((3 << 20) // len(LINE))  # three 1 MiB writes
    nonce, _ = replica.datasets.upload_plan("slow", "d", {"a.jsonl": len(body)}, key_id)
    url = replica.signer.upload_url("http://api", key_id, "slow", "d", nonce, "a.jsonl", len(body))
    opened = replica.store.location.open_atomic_writer

    def slow_writer(relative):
        writer = opened(relative)
        write = writer.write

        def slow_write(data):
            time.sleep(SLOW / 3)
            write(data)

        writer.write = slow_write
        return writer

    monkeypatch.setattr(replica.store.location, "open_atomic_writer", slow_writer)

    async def signed_put(client):
        async def chunks():
            for start in range(0, len(body), 64 << 10):
                yield body[start:start + (64 << 10)]

        return await client.put(url.removeprefix("http://api"), content=chunks())

    put, others = asyncio.run(_others_while(signed_put, keys))
    assert put.status_code == 200 and put.json() == {"bytes": len(body)}, put.text
    for seconds, reply in others:
        assert reply.status_code == 200, reply.text
        assert seconds < QUICK, f"{reply.request.url} took {seconds:.2f}s while a signed PUT was written"
    assert replica.datasets.validate("slow", "d").example_count == str(len(body) // len(LINE))
