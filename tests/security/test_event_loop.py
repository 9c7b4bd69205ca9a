"""Issue 10, item 7: while a large dataset is validated (seconds of expanding and
counting lines), the running service still answers `/healthz` and another account's
GET promptly: storage I/O runs in the API replica's thread pool, not on its event loop.

The dataset: about 250 MB of short JSONL lines in under 1 MB of gzip, within the
default 500 MiB dataset limit, which this 2-core machine validates in about 10 s
(measured: median answer about 100 ms, slowest about 220 ms). The
bound: each answer within ONE_ANSWER; most within the issue's 200 ms (the validation
holds the GIL in the same process between its zlib calls, so an answer now and then
waits for it; before the fix every answer waited for the whole validation)."""

from __future__ import annotations

import json
import statistics
import threading
import time
import zlib

import httpx
import pytest

ACCOUNT, OTHER = "loop-big", "loop-other"
EXPANDED = 250 << 20
ONE_ANSWER = 1.0  # seconds, the slowest answer allowed
MEDIAN = 0.2  # seconds, the bound, for the median answer


def _big_gzip() -> bytes:
    line = json.dumps({"custom_id": "x", "body": {"messages": [{"role": "user", "content": "a" * 40}]}}).encode() + b"\n"
    block = line * ((1 << 20) // len(line))
    stream = zlib.compressobj(6, zlib.DEFLATED, 31)
    return b"".join(stream.compress(block) for _ in range(EXPANDED // len(block))) + stream.flush()


def _lines(data: bytes) -> int:
    return zlib.decompress(data, 31).count(b"\n")


@pytest.fixture(scope="module")
def world(service):
    keys = {account: service.key(account) for account in (ACCOUNT, OTHER)}
    data = _big_gzip()
    assert len(data) < 1 << 20

    def call(account, method, path, **kwargs) -> httpx.Response:
        return httpx.request(method, f"{service.base_url}/v1/accounts/{account}/{path}",
                             headers={"Authorization": f"Bearer {keys[account]}"}, timeout=300, **kwargs)

    assert call(OTHER, "POST", "datasets", json={"datasetId": "mine", "dataset": {"userUploaded": {}}}).status_code == 200
    return call, data


def _answers_while(service, call, slow) -> tuple[httpx.Response, list[float]]:
    """Run `slow()` in a thread; meanwhile time /healthz and OTHER's GET, one after
    the other, until it returns."""
    result = {}
    worker = threading.Thread(target=lambda: result.update(reply=slow()))
    worker.start()
    time.sleep(1.0)  # the request has reached the replica and its validation
    times = []
    while worker.is_alive():
        for request in (lambda: httpx.get(f"{service.base_url}/healthz", timeout=30),
                        lambda: call(OTHER, "GET", "datasets/mine")):
            started = time.monotonic()
            reply = request()
            if worker.is_alive():  # only answers given while the validation ran count
                times.append(time.monotonic() - started)
            assert reply.status_code == 200, reply.text
        time.sleep(0.05)
    worker.join()
    return result["reply"], times


def _check(times: list[float]) -> None:
    print(f"{len(times)} answers while validating: median {statistics.median(times) * 1000:.0f} ms, "
          f"max {max(times) * 1000:.0f} ms")
    assert len(times) >= 10, f"only {len(times)} answers measured: the validation was too short to tell"
    assert max(times) < ONE_ANSWER, sorted(times)[-5:]
    assert statistics.median(times) < MEDIAN, times


def test_other_requests_are_answered_while_validate_upload_runs(service, world):
    call, data = world
    assert call(ACCOUNT, "POST", "datasets", json={"datasetId": "signed", "dataset": {"userUploaded": {}}}).status_code == 200
    urls = call(ACCOUNT, "POST", "datasets/signed:getUploadEndpoint",
                json={"filenameToSize": {"big.jsonl": len(data)}}).json()["filenameToSignedUrls"]
    assert httpx.put(urls["big.jsonl"], content=data, timeout=120).status_code == 200
    reply, times = _answers_while(service, call, lambda: call(ACCOUNT, "POST", "datasets/signed:validateUpload", json={}))
    assert reply.status_code == 200, reply.text
    assert reply.json()["state"] == "READY" and reply.json()["exampleCount"] == str(_lines(data))
    _check(times)


def test_other_requests_are_answered_while_an_upload_validates(service, world):
    call, data = world
    assert call(ACCOUNT, "POST", "datasets", json={"datasetId": "posted", "dataset": {"userUploaded": {}}}).status_code == 200
    reply, times = _answers_while(service, call, lambda: call(
        ACCOUNT, "POST", "datasets/posted:upload", files={"file": ("big.jsonl", data)}))
    assert reply.status_code == 200, reply.text
    assert call(ACCOUNT, "GET", "datasets/posted").json()["exampleCount"] == str(_lines(data))
    _check(times)
