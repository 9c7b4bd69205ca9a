"""Issue 12, against the running service with the SDK, raw HTTP and the CLI: a dataset
read in place from S3 (moto) by a job, never copied; its fields as the SDK types them;
a dry run; the parts of a running job's output downloaded while it runs; and the error
body Fireworks' gateway sends, with the SDK still raising the right classes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import boto3
import fireworks
import httpx
import pytest

from raybatch.store import Store
from tests.helpers import InputBuilder, chat, check_run, dataset_files_url, read_jsonl, sdk_client, wait_job, wait_until

ACCOUNT = "in-place"


@pytest.fixture(scope="module")
def key(service):
    return service.key(ACCOUNT)


@pytest.fixture(scope="module")
def client(service, key):
    return sdk_client(service.base_url, key, ACCOUNT)


@pytest.fixture(scope="module")
def http(service, key):
    with httpx.Client(base_url=f"{service.base_url}/v1/accounts/{ACCOUNT}", timeout=120,
                      headers={"Authorization": f"Bearer {key}"}) as session:
        yield session


@pytest.fixture(scope="module")
def on_s3(s3_endpoint):
    """Two shards under an S3 prefix of a bucket the service's credentials reach, one
    bad line among them."""
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket="corpora")
    built = InputBuilder()
    for i in range(6):
        built.ok("part-1.jsonl", f"s3-a{i}", chat(f"first shard {i}"))
    built.add("part-1.jsonl", b"{broken", error="invalid_json")
    for i in range(4):
        built.ok("more/part-2.jsonl", f"s3-b{i}", chat(f"second shard {i}"))
    built.write("s3://corpora/batch-1")
    return built


def test_an_s3_prefix_is_read_in_place_by_a_job_and_never_copied(service, client, http, on_s3):
    url = "s3://corpora/batch-1/"
    created = client.datasets.create(dataset_id="from-s3", dataset={"external_url": url, "format": "CHAT",
                                                                     "display_name": "in place"})
    assert created.external_url == url and created.format == "CHAT"
    dataset = wait_until(lambda: (d := client.datasets.get("from-s3")).state == "READY" and d, timeout=60,
                         message="the external dataset never became READY")
    lines = [line for shard in on_s3.shards.values() for line in shard]
    assert dataset.example_count == "11" and dataset.external_url == url and dataset.format == "CHAT"
    assert dataset.estimated_token_count == str(-(-sum(len(line) - 1 for line in lines) // 4))
    listed = http.get("/datasets", params={"filter": 'displayName="in place"'}).json()["datasets"]
    assert [(d["externalUrl"], d["format"], d["estimatedTokenCount"]) for d in listed] == [
        (url, "CHAT", dataset.estimated_token_count)]
    # Nothing of it in the store: no files/ folder at all.
    assert Store(service.storage).location.list(f"accounts/{ACCOUNT}/datasets/from-s3") == ["dataset.json"]
    assert http.post("/datasets/from-s3:getUploadEndpoint", json={"filenameToSize": {"x.jsonl": 3}}).json()[
        "message"] == "dataset from-s3 is READY; its files cannot change"

    client.batch_inference_jobs.create(batch_inference_job_id="reads-s3", model="scripted", input_dataset_id="from-s3")
    job, _ = wait_job(client, "reads-s3", timeout=120)
    assert job.state == "JOB_STATE_COMPLETED", job.status
    assert job.job_progress.total_input_requests == 11 and job.job_progress.failed_requests == 1
    check_run(dataset_files_url(service.storage, ACCOUNT, job.output_dataset_id), on_s3.expected)
    # sourceDatasetId is kept as given, and followed by the download lineage.
    client.datasets.create(dataset_id="derived", dataset={"user_uploaded": {}}, source_dataset_id="from-s3")
    assert http.get("/datasets/derived").json()["sourceDatasetId"] == "from-s3"


def test_a_dry_run_reports_lines_bad_lines_and_tokens_and_runs_nothing(service, key, client, http, on_s3):
    wait_until(lambda: client.datasets.get("from-s3").state == "READY", timeout=60)
    jobs_before = http.get("/batchInferenceJobs").json()["totalSize"]
    body = {"model": "scripted", "inputDatasetId": "from-s3", "inferenceParameters": {"maxTokens": 8}}
    report = http.post("/batchInferenceJobs:validate", json=body)
    assert report.status_code == 200, report.text
    assert report.json() | {"inputTokens": 0} == {
        "model": "scripted", "inputDatasetId": f"accounts/{ACCOUNT}/datasets/from-s3", "shards": 2, "totalLines": 11,
        "blankLines": 0, "validLines": 10, "badLines": {"invalid_json": 1}, "inputTokens": 0,
        "inputTokensMethod": "estimate"}
    assert report.json()["inputTokens"] > 0
    assert http.post("/batchInferenceJobs:validate", json={**body, "model": "nope"}).json()["code"] == 3
    # The CLI's form prints the same report.
    env = {**os.environ, "RAYBATCH_BASE_URL": service.base_url, "RAYBATCH_API_KEY": key, "RAYBATCH_ACCOUNT": ACCOUNT}
    done = subprocess.run([sys.executable, "-m", "raybatch.cli", "job", "create", "--dry-run", "-m", "scripted",
                           "-d", "from-s3", "--max-tokens", "8"], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == report.json()
    assert http.get("/batchInferenceJobs").json()["totalSize"] == jobs_before  # nothing was created


def test_external_urls_the_service_must_not_read_are_refused(http, service):
    for url, message in (
        ("file:///etc/passwd", "externalUrl 'file:///etc/passwd' is not read: use s3://, gs://, https:// "
                               "(local files and other schemes are refused)"),
        (service.storage, f"externalUrl {service.storage!r} is not read: use s3://, gs://, https:// "
                          "(local files and other schemes are refused)"),
        ("https://169.254.169.254/latest/x.jsonl", "externalUrl host '169.254.169.254' resolves to 169.254.169.254, "
                                                   "a non-public address: the service does not read its own network"),
    ):
        reply = http.post("/datasets", json={"datasetId": "sneaky", "dataset": {"externalUrl": url}})
        assert reply.status_code == 400 and reply.json()["message"] == message, reply.text
        assert http.get("/datasets/sneaky").status_code == 404  # nothing was created


def test_a_running_jobs_committed_parts_download_with_a_partial_flag(service, client, http):
    built = InputBuilder()
    for i in range(30):
        built.ok("in.jsonl", f"slow-{i}", chat(f"slow {i}"))
    data = b"".join(line for line in built.shards["in.jsonl"])
    client.datasets.create(dataset_id="slow-in", dataset={"user_uploaded": {}})
    client.datasets.upload("slow-in", file=data)
    client.batch_inference_jobs.create(batch_inference_job_id="slow-partial", model="scripted-slow",
                                       input_dataset_id="slow-in")
    output = "slow-partial-output"

    def some_committed():
        job = client.batch_inference_jobs.get("slow-partial")
        assert job.state not in ("JOB_STATE_COMPLETED", "JOB_STATE_FAILED"), job.state
        return job.state == "JOB_STATE_RUNNING" and job.job_progress.total_processed_requests >= 3

    wait_until(some_committed, timeout=120, message="no part committed")
    answer = http.get(f"/datasets/{output}:getDownloadEndpoint").json()
    assert answer["partial"] is True and answer["filenameToSignedUrls"], answer
    assert all(name.startswith(("results-", "errors-")) and name.endswith(".jsonl") for name in answer["filenameToSignedUrls"])
    fetched = []
    for url in answer["filenameToSignedUrls"].values():
        reply = httpx.get(url, timeout=60)
        assert reply.status_code == 200
        fetched += [json.loads(line) for line in reply.text.splitlines()]
    assert fetched and len({row["custom_id"] for row in fetched}) == len(fetched)
    assert all(row["error"] is None and row["response"]["status_code"] == 200 for row in fetched)
    # The SDK reads the same answer (the flag is an extra field to it).
    assert client.datasets.get_download_endpoint(output).filename_to_signed_urls

    http.post("/batchInferenceJobs/slow-partial:cancel").raise_for_status()
    wait_job(client, "slow-partial", timeout=120)
    final = read_jsonl(f"{dataset_files_url(service.storage, ACCOUNT, output)}/results.jsonl")
    # Every line fetched while it ran is a real committed result, unchanged at the end.
    assert all(row in final for row in fetched)
    done = http.get(f"/datasets/{output}:getDownloadEndpoint").json()
    assert "partial" not in done and set(done["filenameToSignedUrls"]) <= {"results.jsonl", "errors.jsonl"}


def test_errors_are_fireworks_gateway_bodies_and_the_sdk_raises_by_status(client, http):
    with pytest.raises(fireworks.NotFoundError) as missing:
        client.datasets.get("no-such-dataset")
    message = "dataset no-such-dataset not found"
    assert missing.value.body == {"code": 5, "message": message, "details": [],
                                  "error": {"code": 404, "message": message, "status": "NOT_FOUND"}}
    with pytest.raises(fireworks.BadRequestError) as bad:
        client.datasets.create(dataset_id="Bad_Id", dataset={})
    assert bad.value.body["code"] == 3 and bad.value.body["error"]["status"] == "INVALID_ARGUMENT"
    client.datasets.create(dataset_id="twice", dataset={"user_uploaded": {}})
    with pytest.raises(fireworks.ConflictError) as twice:
        client.datasets.create(dataset_id="twice", dataset={"user_uploaded": {}})
    assert twice.value.body["code"] == 6
    routed = http.get("/nothing/here")
    assert routed.status_code == 404 and routed.json()["code"] == 5 and routed.json()["details"] == []
