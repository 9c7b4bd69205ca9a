"""Issue 10, item 6: one account cannot pile up datasets, bytes or queued jobs, nor
flood the API with requests. Attacks through the running service's HTTP API, on the
accounts with small quotas of the test service (tests/helpers.py `service_config`)."""

from __future__ import annotations

import gzip
import json
import time
from concurrent.futures import ThreadPoolExecutor

import httpx

from raybatch.store import Store
from tests.helpers import wait_until

LINE = json.dumps({"custom_id": "x", "body": {"messages": [{"role": "user", "content": "hi"}]}}).encode() + b"\n"
TERMINAL = ("JOB_STATE_COMPLETED", "JOB_STATE_FAILED", "JOB_STATE_CANCELLED", "JOB_STATE_EXPIRED")


def _call(service, key, method, path, **kwargs) -> httpx.Response:
    return httpx.request(method, f"{service.base_url}/v1/accounts/{path}", headers={"Authorization": f"Bearer {key}"},
                         timeout=60, **kwargs)


def _new_dataset(service, key, account: str, dataset_id: str) -> httpx.Response:
    return _call(service, key, "POST", f"{account}/datasets", json={"datasetId": dataset_id, "dataset": {"userUploaded": {}}})


def _exhausted(reply: httpx.Response, message: str) -> None:
    assert reply.status_code == 429, reply.text
    assert reply.json() == {"code": 8, "message": message, "details": [],
                            "error": {"code": 429, "message": message, "status": "RESOURCE_EXHAUSTED"}}


def test_an_account_cannot_create_datasets_past_its_quota(service):
    account, key = "quota-datasets", service.key("quota-datasets")
    for n in range(3):
        assert _new_dataset(service, key, account, f"d{n}").status_code == 200
    _exhausted(_new_dataset(service, key, account, "d3"),
               "account quota-datasets has 3 datasets, its quota of 3 (output datasets of jobs count); "
               "delete datasets it no longer needs")
    assert _call(service, key, "GET", f"{account}/datasets/d3").status_code == 404  # nothing was made
    assert len(_call(service, key, "GET", f"{account}/datasets").json()["datasets"]) == 3
    assert _call(service, key, "DELETE", f"{account}/datasets/d0").status_code == 200
    assert _new_dataset(service, key, account, "d3").status_code == 200


def test_an_account_cannot_store_bytes_past_its_quota_by_any_upload_path(service):
    account, key = "quota-bytes", service.key("quota-bytes")
    assert _new_dataset(service, key, account, "big").status_code == 200
    big = LINE * (15_000 // len(LINE))
    assert _call(service, key, "POST", f"{account}/datasets/big:upload", files={"file": ("in.jsonl", big)}).status_code == 200
    left = 20_000 - len(big)

    # One request: refused while it streams, nothing left behind.
    assert _new_dataset(service, key, account, "more").status_code == 200
    more = LINE * (10_000 // len(LINE))
    _exhausted(_call(service, key, "POST", f"{account}/datasets/more:upload", files={"file": ("in.jsonl", more)}),
               f"account quota-bytes would store more than its quota of 20000 bytes: this dataset needs "
               f"{len(more)}, {left} are left; delete datasets it no longer needs")
    dataset = _call(service, key, "GET", f"{account}/datasets/more").json()
    assert dataset["state"] == "UPLOADING"
    assert Store(service.storage).dataset_files(account, "more").list() == []  # nothing left behind

    # Signed URLs: the registered sizes are checked first...
    _exhausted(_call(service, key, "POST", f"{account}/datasets/more:getUploadEndpoint",
                     json={"filenameToSize": {"in.jsonl": len(more)}}),
               f"account quota-bytes would store more than its quota of 20000 bytes: this dataset needs "
               f"{len(more)}, {left} are left; delete datasets it no longer needs")
    # ...and a small gzip that expands past the quota is refused at validation.
    packed = gzip.compress(LINE * 2000)
    assert len(packed) < left < len(LINE) * 2000
    urls = _call(service, key, "POST", f"{account}/datasets/more:getUploadEndpoint",
                 json={"filenameToSize": {"in.jsonl": len(packed)}}).json()["filenameToSignedUrls"]
    assert httpx.put(urls["in.jsonl"], content=packed, timeout=60).status_code in (200, 204)
    reply = _call(service, key, "POST", f"{account}/datasets/more:validateUpload", json={})
    assert reply.status_code == 429 and "would store more than its quota of 20000 bytes" in reply.json()["error"]["message"]
    assert _call(service, key, "GET", f"{account}/datasets/more").json()["state"] == "UPLOADING"

    # Deleting frees the room: the same registration and PUT now pass.
    assert _call(service, key, "DELETE", f"{account}/datasets/big").status_code == 200
    urls = _call(service, key, "POST", f"{account}/datasets/more:getUploadEndpoint",
                 json={"filenameToSize": {"in.jsonl": len(more)}}).json()["filenameToSignedUrls"]
    assert httpx.put(urls["in.jsonl"], content=more, timeout=60).status_code in (200, 204)
    reply = _call(service, key, "POST", f"{account}/datasets/more:validateUpload", json={})
    assert reply.status_code == 200 and reply.json()["state"] == "READY", reply.text


def test_an_account_cannot_queue_jobs_past_its_quota(service):
    """quota-jobs runs one job at a time and may have two waiting: a burst of creates is
    refused from the fourth job at the latest (one running, two waiting), however fast
    the scheduler starts them. Once they end, creating works again."""
    account, key = "quota-jobs", service.key("quota-jobs")
    assert _new_dataset(service, key, account, "in").status_code == 200
    lines = b"".join(json.dumps({"custom_id": f"r{i}", "body": {"messages": [{"role": "user", "content": "hi"}]}}).encode()
                     + b"\n" for i in range(30))
    assert _call(service, key, "POST", f"{account}/datasets/in:upload", files={"file": ("in.jsonl", lines)}).status_code == 200
    created, refused = [], None
    for n in range(6):
        reply = _call(service, key, "POST", f"{account}/batchInferenceJobs", params={"batchInferenceJobId": f"j{n}"},
                      json={"model": "scripted-slow", "inputDatasetId": "in"})
        if reply.status_code != 200:
            refused = reply
            break
        created.append(f"j{n}")
    assert refused is not None and 2 <= len(created) <= 3, (created, refused and refused.text)
    waiting = 2
    _exhausted(refused, f"account quota-jobs has {waiting} jobs waiting to run, its quota of 2; create more once some "
                        "have started or ended, or cancel some")
    assert _call(service, key, "GET", f"{account}/batchInferenceJobs/j{len(created)}").status_code == 404
    jobs = _call(service, key, "GET", f"{account}/batchInferenceJobs").json()["batchInferenceJobs"]
    assert sum(job["state"] == "JOB_STATE_RUNNING" for job in jobs) <= 1  # its running quota
    for job_id in created:
        _call(service, key, "POST", f"{account}/batchInferenceJobs/{job_id}:cancel")
    wait_until(lambda: all(_call(service, key, "GET", f"{account}/batchInferenceJobs/{j}").json()["state"] in TERMINAL
                           for j in created), timeout=120, interval=1)
    again = _call(service, key, "POST", f"{account}/batchInferenceJobs", params={"batchInferenceJobId": "after"},
                  json={"model": "scripted", "inputDatasetId": "in"})
    assert again.status_code == 200, again.text


def test_a_key_that_floods_the_api_gets_429_with_retry_after_and_others_do_not(service):
    """rate-limited: bursts of 5, then 1 request a second. 20 requests at once: its
    burst passes (and at most a token a second after it), the rest get 429 with
    Retry-After; another account's key is not slowed; after Retry-After it passes."""
    account, key = "rate-limited", service.key("rate-limited")
    other = service.key("rate-neighbour")
    started = time.monotonic()
    with ThreadPoolExecutor(20) as pool:
        replies = list(pool.map(lambda _: _call(service, key, "GET", f"{account}/datasets"), range(20)))
    elapsed = time.monotonic() - started
    statuses = [r.status_code for r in replies]
    assert set(statuses) == {200, 429}, statuses
    assert 5 <= statuses.count(200) <= 5 + int(elapsed) + 1, (statuses, elapsed)
    limited = [r for r in replies if r.status_code == 429]
    for reply in limited:
        assert 1 <= int(reply.headers["Retry-After"]) <= 2
        error = reply.json()["error"]
        assert (error["code"], error["status"]) == (429, "RESOURCE_EXHAUSTED")
        assert error["message"].startswith("API key k") and "more than 1 requests per second (bursts of 5)" in error["message"]
    # Another account's key is not slowed by it.
    assert [_call(service, other, "GET", "rate-neighbour/datasets").status_code for _ in range(6)] == [200] * 6
    time.sleep(max(int(r.headers["Retry-After"]) for r in limited))
    assert _call(service, key, "GET", f"{account}/datasets").status_code == 200
