"""The service on S3 storage (moto's server): a second Serve app on the same cluster,
under /s3, with small limits. Uploads go straight to S3 through presigned URLs,
downloads come from them, and the size limits answer 413."""

from __future__ import annotations


import boto3
import httpx
import pytest

from tests.helpers import InputBuilder, chat, check_run, sdk_client, second_app, service_config, wait_job, wait_until

ACCOUNT = "s3user"
MIB = 1 << 20


@pytest.fixture(scope="module")
def s3_service(service, s3_endpoint, tiny_model):
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket="raybatch-service")
    config = {**service_config("s3://raybatch-service/root", tiny_model), "max_upload_bytes": MIB, "max_dataset_bytes": 2 * MIB}
    with second_app(service, config, "s3") as app:
        yield app


def test_presigned_upload_job_and_download_on_s3(s3_service, s3_endpoint, tmp_path):
    client = sdk_client(s3_service.base_url, s3_service.key(ACCOUNT), ACCOUNT)
    built = InputBuilder()
    for i in range(5):
        built.ok("input.jsonl", f"s3-{i}", chat(f"on s3 {i}"))
    built.write(str(tmp_path))
    data = (tmp_path / "input.jsonl").read_bytes()
    client.datasets.create(dataset_id="on-s3", dataset={"user_uploaded": {}})
    urls = client.datasets.get_upload_endpoint("on-s3", filename_to_size={"input.jsonl": str(len(data))})
    url = urls.filename_to_signed_urls["input.jsonl"]
    assert url.startswith(s3_endpoint) and "X-Amz-Signature" in url  # straight to S3, not via the API
    httpx.put(url, content=data).raise_for_status()
    assert client.datasets.get("on-s3").state == "UPLOADING"
    client.datasets.validate_upload("on-s3", body={})
    # READY at once only within validation_wait_seconds (1 s); on a busy machine later.
    ready = wait_until(lambda: (d := client.datasets.get("on-s3")).state == "READY" and d, timeout=60)
    assert ready.example_count == "5"

    client.batch_inference_jobs.create(batch_inference_job_id="s3-job", model="scripted", input_dataset_id="on-s3")
    job, _ = wait_job(client, "s3-job", timeout=120)
    assert job.state == "JOB_STATE_COMPLETED", job.status
    check_run(f"{s3_service.storage}/accounts/{ACCOUNT}/datasets/s3-job-output/files", built.expected)
    links = client.datasets.get_download_endpoint("s3-job-output").filename_to_signed_urls
    assert all(link.startswith(s3_endpoint) for link in links.values())
    results = httpx.get(links["results.jsonl"]).text.splitlines()
    assert len(results) == 5


def test_size_limits_answer_413_and_keep_nothing(s3_service):
    client = sdk_client(s3_service.base_url, s3_service.key(ACCOUNT), ACCOUNT)
    client.datasets.create(dataset_id="too-big", dataset={"user_uploaded": {}})
    line = b'{"custom_id": "x", "body": {"messages": [{"role": "user", "content": "' + b"a" * 1000 + b'"}]}}\n'
    headers = {"Authorization": f"Bearer {client.api_key}"}
    reply = httpx.post(f"{s3_service.base_url}/v1/accounts/{ACCOUNT}/datasets/too-big:upload",
                       files={"file": ("input.jsonl", line * 1100)}, headers=headers)
    assert reply.status_code == 413 and reply.json()["error"]["status"] == "RESOURCE_EXHAUSTED"
    reply = httpx.post(f"{s3_service.base_url}/v1/accounts/{ACCOUNT}/datasets/too-big:getUploadEndpoint",
                       json={"filenameToSize": {"input.jsonl": str(3 * MIB)}}, headers=headers)
    assert reply.status_code == 413
    assert client.datasets.get("too-big").state == "UPLOADING"
    assert not client.datasets.get_download_endpoint("too-big").filename_to_signed_urls
    # The URL signs Content-Length, so S3 refuses another size; moto does not check
    # signatures, and validateUpload measures what arrived anyway.
    urls = client.datasets.get_upload_endpoint("too-big", filename_to_size={"input.jsonl": str(MIB)})
    httpx.put(urls.filename_to_signed_urls["input.jsonl"], content=line * 2200).raise_for_status()
    reply = httpx.post(f"{s3_service.base_url}/v1/accounts/{ACCOUNT}/datasets/too-big:validateUpload", json={}, headers=headers)
    assert reply.status_code == 400 and "registered" in reply.json()["error"]["message"]
    assert client.datasets.get("too-big").state == "UPLOADING"


def test_an_external_url_into_the_services_own_bucket_is_refused(s3_service, s3_endpoint):
    """Issue 12: an account must not read the store (other accounts' files, the key
    records) through the service's own credentials by naming it as an externalUrl."""
    headers = {"Authorization": f"Bearer {s3_service.key(ACCOUNT)}"}
    boto3.client("s3", endpoint_url=s3_endpoint).put_object(
        Bucket="raybatch-service", Key="elsewhere/in.jsonl", Body=b'{"custom_id": "x", "body": {"prompt": "x"}}\n')
    for url in ("s3://raybatch-service/root/accounts/victim/datasets/secret/files/", "s3://raybatch-service",
                "s3://raybatch-service/ro", "s3://raybatch-service/root/keys"):
        reply = httpx.post(f"{s3_service.base_url}/v1/accounts/{ACCOUNT}/datasets", headers=headers,
                           json={"datasetId": "peek", "dataset": {"externalUrl": url}})
        assert reply.status_code == 400 and reply.json() == {
            "code": 3, "details": [], "message": f"externalUrl {url!r} points into the service's own storage",
            "error": {"code": 400, "status": "INVALID_ARGUMENT",
                      "message": f"externalUrl {url!r} points into the service's own storage"}}, reply.text
    # The same bucket outside the service's root is another tenant-readable prefix.
    reply = httpx.post(f"{s3_service.base_url}/v1/accounts/{ACCOUNT}/datasets", headers=headers,
                       json={"datasetId": "outside-root", "dataset": {"externalUrl": "s3://raybatch-service/elsewhere/"}})
    assert reply.status_code == 200, reply.text
