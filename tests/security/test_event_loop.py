"""Issue 10, item 7: a large dataset validates in the background. `:validateUpload`
and `:upload` answer within PROMPT (UPLOADING, "validating: ..."), the dataset's GET
shows the progress (bytes read, lines counted) and then READY; meanwhile the running
service still answers `/healthz` and another account's GET promptly (storage I/O and
the validation run off the API replica's event loop).

The dataset: 400 MiB of short JSONL lines in under 2 MB of gzip, within the
default 500 MiB dataset limit, which this 2-core machine validates in about 10 s
(measured: median answer about 50 ms, slowest about 150 ms). At 250 MiB a faster CI
machine validated it between five GETs, too few to tell. The
bound: each answer within ONE_ANSWER; most within the issue's 200 ms (the validation
holds the GIL in the same process between its zlib calls, so an answer now and then
waits for it; before the fix every answer waited for the whole validation)."""

from __future__ import annotations

import json
import re
import statistics
import time
import zlib

import httpx
import pytest

ACCOUNT, OTHER = "loop-big", "loop-other"
EXPANDED = 400 << 20
ONE_ANSWER = 1.0  # seconds, the slowest answer allowed
MEDIAN = 0.2  # seconds, the bound, for the median answer
PROMPT = 3.0  # seconds :validateUpload and :upload may take (they wait 1 s for the validation)


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
    assert len(data) < 2 << 20

    def call(account, method, path, **kwargs) -> httpx.Response:
        return httpx.request(method, f"{service.base_url}/v1/accounts/{account}/{path}",
                             headers={"Authorization": f"Bearer {keys[account]}"}, timeout=300, **kwargs)

    assert call(OTHER, "POST", "datasets", json={"datasetId": "mine", "dataset": {"userUploaded": {}}}).status_code == 200
    return call, data


def _answers_until_validated(service, call, dataset_id: str) -> tuple[dict, list[float], list[str]]:
    """Until `dataset_id` is validated, time /healthz and OTHER's GET, one after the
    other, and read the dataset's status; its last state, the times, the messages."""
    times, messages = [], []
    deadline = time.monotonic() + 300
    while True:
        dataset = call(ACCOUNT, "GET", f"datasets/{dataset_id}").json()
        if dataset["state"] == "READY" or dataset["status"]["code"] != "OK":
            return dataset, times, messages
        messages.append(dataset["status"]["message"])
        for request in (lambda: httpx.get(f"{service.base_url}/healthz", timeout=30),
                        lambda: call(OTHER, "GET", "datasets/mine")):
            started = time.monotonic()
            reply = request()
            times.append(time.monotonic() - started)
            assert reply.status_code == 200, reply.text
        assert time.monotonic() < deadline, f"{dataset_id} still validating: {messages[-1]}"
        time.sleep(0.05)


def _check(times: list[float]) -> None:
    print(f"{len(times)} answers while validating: median {statistics.median(times) * 1000:.0f} ms, "
          f"max {max(times) * 1000:.0f} ms")
    assert len(times) >= 10, f"only {len(times)} answers measured: the validation was too short to tell"
    assert max(times) < ONE_ANSWER, sorted(times)[-5:]
    assert statistics.median(times) < MEDIAN, times


def _check_progress(messages: list[str], data: bytes) -> None:
    """GET showed the validation going: expanded bytes measured, then read, growing
    (the replica validating it shows its progress live), lines counted."""
    print(f"{len(messages)} progress messages, e.g. {messages[len(messages) // 2]!r}")
    expanded = len(zlib.decompress(data, 31))
    text = " ".join(messages)
    read = [int(m) for m in re.findall(r"(\d+) of %d bytes read" % expanded, text)]
    measured = [int(m) for m in re.findall(r"expanded size, (\d+) bytes so far", text)]
    assert len(set(read)) + len(set(measured)) >= 3 and any(0 < n < expanded for n in read), messages
    assert any("counting lines" in m for m in messages), messages
    assert all(m.startswith("validating: ") for m in messages), messages


def _timed(request) -> tuple[httpx.Response, float]:
    started = time.monotonic()
    reply = request()
    return reply, time.monotonic() - started


def test_validate_upload_answers_at_once_and_validates_in_the_background(service, world):
    call, data = world
    assert call(ACCOUNT, "POST", "datasets", json={"datasetId": "signed", "dataset": {"userUploaded": {}}}).status_code == 200
    urls = call(ACCOUNT, "POST", "datasets/signed:getUploadEndpoint",
                json={"filenameToSize": {"big.jsonl": len(data)}}).json()["filenameToSignedUrls"]
    assert httpx.put(urls["big.jsonl"], content=data, timeout=120).status_code == 200
    reply, seconds = _timed(lambda: call(ACCOUNT, "POST", "datasets/signed:validateUpload", json={}))
    assert reply.status_code == 200, reply.text
    assert seconds < PROMPT, f":validateUpload took {seconds:.1f}s"
    assert reply.json()["state"] == "UPLOADING" and reply.json()["status"]["message"].startswith("validating: "), reply.json()
    dataset, times, messages = _answers_until_validated(service, call, "signed")
    assert dataset["state"] == "READY", dataset["status"]
    assert dataset["exampleCount"] == str(_lines(data)) and dataset["sizeBytes"] == str(len(zlib.decompress(data, 31)))
    assert dataset["status"] == {"code": "OK", "message": ""}
    _check_progress(messages, data)
    _check(times)


def test_an_upload_answers_at_once_and_validates_in_the_background(service, world):
    call, data = world
    assert call(ACCOUNT, "POST", "datasets", json={"datasetId": "posted", "dataset": {"userUploaded": {}}}).status_code == 200
    reply, seconds = _timed(lambda: call(ACCOUNT, "POST", "datasets/posted:upload", files={"file": ("big.jsonl", data)}))
    assert reply.status_code == 200, reply.text
    assert seconds < PROMPT, f":upload took {seconds:.1f}s"
    dataset, times, messages = _answers_until_validated(service, call, "posted")
    assert dataset["state"] == "READY", dataset["status"]
    assert dataset["exampleCount"] == str(_lines(data))
    _check_progress(messages, data)
    _check(times)
