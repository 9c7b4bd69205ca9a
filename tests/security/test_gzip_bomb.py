"""Issue 10, item 3: small gzip uploads that expand to gigabytes, or that carry 1 MB
custom_ids, cannot exhaust the head node. Real gzip bombs through the running service's
HTTP API, and a bomb placed straight in a run's input."""

from __future__ import annotations

import json
import time
import zlib

import httpx
import pytest

from raybatch.config import RunConfig, ServiceConfig
from raybatch.exceptions import InputTooLarge
from raybatch.store import Store
from tests.helpers import dataset_files_url, read_jsonl, validation_outcome

ACCOUNT = "bomber"
LIMIT = ServiceConfig.model_fields["max_dataset_bytes"].default  # the service runs with the default
REFUSED = ("RESOURCE_EXHAUSTED",
           f"dataset expands to more than its limit of {LIMIT} bytes (gzip files count decompressed; bomb.jsonl passed it)")


def _gzip(chunks) -> bytes:
    stream = zlib.compressobj(6, zlib.DEFLATED, 31)  # wbits 31: a gzip container
    return b"".join(stream.compress(chunk) for chunk in chunks) + stream.flush()


def _bomb(expanded: int) -> bytes:
    """Valid JSONL: the same 1 KB request over and over, `expanded` bytes or a bit more."""
    line = json.dumps({"custom_id": "x", "body": {"messages": [{"role": "user", "content": "a" * 1000}]}}).encode() + b"\n"
    block = line * ((1 << 20) // len(line) + 1)
    return _gzip(block for _ in range(expanded // len(block) + 1))


def _long_id_bomb(lines: int = 50, id_bytes: int = 1_000_000) -> bytes:
    return _gzip(
        json.dumps({"custom_id": f"{i:03d}" + "i" * id_bytes, "body": {"messages": [{"role": "user", "content": "hi"}]}}).encode() + b"\n"
        for i in range(lines)
    )


def _call(service, key, method, path, **kwargs) -> httpx.Response:
    return httpx.request(method, f"{service.base_url}/v1/accounts/{ACCOUNT}/{path}",
                         headers={"Authorization": f"Bearer {key}"}, timeout=120, **kwargs)


def _wait(service, key, job_id: str, timeout: float = 180) -> tuple[dict, list[str]]:
    seen, deadline = [], time.monotonic() + timeout
    while True:
        job = _call(service, key, "GET", f"batchInferenceJobs/{job_id}").json()
        if not seen or seen[-1] != job["state"]:
            seen.append(job["state"])
        if job["state"] in ("JOB_STATE_COMPLETED", "JOB_STATE_FAILED", "JOB_STATE_CANCELLED", "JOB_STATE_EXPIRED"):
            return job, seen
        assert time.monotonic() < deadline, f"{job_id} is still {job['state']}"
        time.sleep(0.5)


@pytest.fixture(scope="module")
def key(service):
    return service.key(ACCOUNT)


@pytest.fixture(scope="module")
def bomb() -> bytes:
    data = _bomb(LIMIT + (20 << 20))
    assert len(data) < 2 << 20  # under 2 MB uploaded for over 500 MB expanded
    return data


def test_a_gzip_bomb_is_refused_at_upload_and_no_job_can_run_on_it(service, key, bomb):
    assert _call(service, key, "POST", "datasets", json={"datasetId": "bomb", "dataset": {"userUploaded": {}}}).status_code == 200
    reply = _call(service, key, "POST", "datasets/bomb:upload", files={"file": ("bomb.jsonl", bomb)})
    # Expanding 500 MB takes seconds: the validation goes on in the background after
    # the answer, and its refusal is the dataset's status (413 if it ended in time).
    status, code, message = validation_outcome(reply, lambda: _call(service, key, "GET", "datasets/bomb").json())
    assert status in (400, 413) and (code, message) == REFUSED
    assert _call(service, key, "GET", "datasets/bomb").json()["state"] == "UPLOADING"
    assert Store(service.storage).dataset_files(ACCOUNT, "bomb").list() == []  # the upload left nothing
    # A job on it never gets a driver: it fails at VALIDATING.
    created = _call(service, key, "POST", "batchInferenceJobs", params={"batchInferenceJobId": "on-bomb"},
                    json={"model": "scripted", "inputDatasetId": "bomb"})
    assert created.status_code == 200, created.text
    job, seen = _wait(service, key, "on-bomb")
    assert job["state"] == "JOB_STATE_FAILED" and "is UPLOADING, not READY" in job["status"]["message"]
    assert "JOB_STATE_RUNNING" not in seen and "JOB_STATE_PENDING" not in seen
    assert Store(service.storage).get_job(ACCOUNT, "on-bomb").runtime.attempts == 0  # no driver was ever started


def test_a_gzip_bomb_through_signed_urls_is_refused_at_validate_upload(service, key, bomb):
    assert _call(service, key, "POST", "datasets", json={"datasetId": "signed-bomb", "dataset": {"userUploaded": {}}}).status_code == 200
    urls = _call(service, key, "POST", "datasets/signed-bomb:getUploadEndpoint",
                 json={"filenameToSize": {"bomb.jsonl": len(bomb)}}).json()["filenameToSignedUrls"]
    assert httpx.put(urls["bomb.jsonl"], content=bomb, timeout=120).status_code in (200, 204)
    reply = _call(service, key, "POST", "datasets/signed-bomb:validateUpload", json={})
    status, code, message = validation_outcome(reply, lambda: _call(service, key, "GET", "datasets/signed-bomb").json())
    assert status in (400, 413) and (code, message) == REFUSED
    assert _call(service, key, "GET", "datasets/signed-bomb").json()["state"] == "UPLOADING"


def test_long_custom_ids_become_error_rows_and_are_not_echoed(service, key):
    """50 lines with 1 MB custom_ids: about 50 KB of gzip, 50 MB expanded, within the
    dataset limit. Each line is a custom_id_too_long row; no id reaches the files."""
    data = _long_id_bomb()
    assert len(data) < 200_000
    assert _call(service, key, "POST", "datasets", json={"datasetId": "long-ids", "dataset": {"userUploaded": {}}}).status_code == 200
    uploaded = _call(service, key, "POST", "datasets/long-ids:upload", files={"file": ("ids.jsonl", data)})
    assert uploaded.status_code == 200, uploaded.text
    assert validation_outcome(uploaded, lambda: _call(service, key, "GET", "datasets/long-ids").json()) == (200, "OK", "")
    dataset = _call(service, key, "GET", "datasets/long-ids").json()
    assert dataset["state"] == "READY" and dataset["exampleCount"] == "50"
    assert int(dataset["sizeBytes"]) > 50_000_000  # the size that counts is the expanded one
    created = _call(service, key, "POST", "batchInferenceJobs", params={"batchInferenceJobId": "long-ids"},
                    json={"model": "scripted", "inputDatasetId": "long-ids"})
    assert created.status_code == 200, created.text
    job, _ = _wait(service, key, "long-ids")
    assert job["state"] == "JOB_STATE_COMPLETED", job["status"]
    assert job["jobProgress"]["failedRequests"] == 50 and job["jobProgress"]["successfullyProcessedRequests"] == 0
    output = dataset_files_url(service.storage, ACCOUNT, job["outputDatasetId"])
    errors = read_jsonl(f"{output}/errors.jsonl")
    assert sorted(e["error"]["line"] for e in errors) == list(range(1, 51))
    for error in errors:
        assert error["custom_id"] is None and error["error"]["code"] == "custom_id_too_long"
        assert error["error"]["message"] == "custom_id is 1000003 bytes, over the limit of 512; it is not echoed"
    assert sum(len(json.dumps(e)) for e in errors) < 50_000


def test_a_run_stops_at_a_shard_that_expands_past_its_limit(ray_cluster, tmp_path):
    """The reader's own limit, for a shard that never went through validation (changed
    after it, or a `raybatch run` input): the run fails before any row is answered."""
    from raybatch.runner import run_job

    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "bomb.jsonl").write_bytes(_bomb(64 << 20))
    config = RunConfig(input=str(tmp_path / "in"), output=str(tmp_path / "out"), model="scripted",
                       engine={"kind": "scripted"}, max_shard_bytes=8 << 20)
    with pytest.raises(InputTooLarge) as refused:
        run_job(config)
    assert str(refused.value) == (
        f"input shard bomb.jsonl expands to more than {8 << 20} bytes, the input size limit "
        "(a gzip shard counts decompressed); nothing past the limit was read"
    )
    assert not (tmp_path / "out" / "results.jsonl").exists()
