"""Issue 12: what existing Fireworks code sends, sent to the running service with the
official SDK or raw HTTP exactly as a user would: Fireworks model names, requests
Fireworks takes (proto3 zeros, GET bodies posted back, readMask, nameless uploads,
repeated :validateUpload, numeric exampleCount, snake_case parameters), and list
filters and orders. Scripted engines: a job ends in seconds."""

from __future__ import annotations

import json

import fireworks
import httpx
import pytest

from tests.helpers import read_jsonl, dataset_files_url, sdk_client, wait_job

ACCOUNT = "conform"
LLAMA = "accounts/fireworks/models/llama-v3p1-8b-instruct"
LINES = b"".join(json.dumps({"custom_id": f"r{i}", "body": {"messages": [{"role": "user", "content": f"hi {i}"}]}}).encode()
                 + b"\n" for i in range(3))


@pytest.fixture(scope="module")
def key(service):
    return service.key(ACCOUNT)


@pytest.fixture(scope="module")
def client(service, key):
    return sdk_client(service.base_url, key, ACCOUNT)


@pytest.fixture(scope="module")
def http(service, key):
    with httpx.Client(base_url=f"{service.base_url}/v1/accounts/{ACCOUNT}", timeout=60,
                      headers={"Authorization": f"Bearer {key}"}) as session:
        yield session


@pytest.fixture(scope="module")
def ready(client):
    """A READY input dataset, uploaded as `datasets.upload(file=bytes)`: no file name."""
    client.datasets.create(dataset_id="in", dataset={"user_uploaded": {}, "display_name": "the input"})
    assert client.datasets.upload("in", file=LINES).filename == "upload.jsonl"
    assert client.datasets.get("in").state == "READY"
    return "in"


@pytest.fixture(scope="module")
def llama(client, ready):
    """One completed job created under a Fireworks model name; several tests read it."""
    created = client.batch_inference_jobs.create(batch_inference_job_id="llama", model=LLAMA, input_dataset_id=ready)
    assert created.model == LLAMA
    job, _ = wait_job(client, "llama", timeout=120)
    return job


def _error(reply: httpx.Response) -> str:
    assert reply.status_code == 400, reply.text
    return reply.json()["error"]["message"]


# ------------------------------------------------------------------------ model names


def test_a_fireworks_model_name_runs_on_the_catalog_entry_keyed_by_its_hub_id(service, llama):
    job = llama
    assert job.state == "JOB_STATE_COMPLETED" and job.model == LLAMA
    rows = read_jsonl(f"{dataset_files_url(service.storage, ACCOUNT, job.output_dataset_id)}/results.jsonl")
    assert len(rows) == 3 and {row["response"]["body"]["model"] for row in rows} == {LLAMA}


@pytest.mark.parametrize("model", ["accounts/fireworks/models/qwen2p5-72b-instruct", "house-model"])
def test_catalog_aliases_name_their_entry(client, ready, model):
    job_id = "alias-" + model.rsplit("/", 1)[-1].replace("p5", "")
    client.batch_inference_jobs.create(batch_inference_job_id=job_id, model=model, input_dataset_id=ready)
    job, _ = wait_job(client, job_id, timeout=120)
    assert job.state == "JOB_STATE_COMPLETED", job.status


def test_an_unknown_fireworks_name_is_refused_at_create_listing_what_is_served(client, ready):
    with pytest.raises(fireworks.BadRequestError) as refused:
        client.batch_inference_jobs.create(batch_inference_job_id="nope", input_dataset_id=ready,
                                           model="accounts/fireworks/models/deepseek-v3")
    message = str(refused.value)  # "Error code: 400 - {'error': {... 'message': ...}}"
    assert "model 'accounts/fireworks/models/deepseek-v3' is not served here; models served: " in message
    assert f"meta-llama/Llama-3.1-8B-Instruct (also {LLAMA})" in message


# ------------------------------------------------------------ requests Fireworks takes


def test_proto3_zero_inference_parameters_mean_unset(http, ready):
    reply = http.post("/batchInferenceJobs", params={"batchInferenceJobId": "zeros"}, json={
        "model": "scripted", "inputDatasetId": ready,
        "inferenceParameters": {"maxTokens": 0, "n": 0, "topP": 0, "topK": 0, "extraBody": "", "temperature": 0.5}})
    assert reply.status_code == 200, reply.text
    assert reply.json()["inferenceParameters"] == {"temperature": 0.5}


def test_a_job_fetched_with_get_is_posted_back_as_a_template(client, http, ready, llama):
    fetched = llama
    template = http.get("/batchInferenceJobs/llama").json()
    assert {"name", "state", "createTime", "updateTime", "createdBy", "jobProgress", "status"} <= set(template)
    # Its output dataset exists (the first job's); a new job writes a new one.
    template.pop("outputDatasetId")
    reply = http.post("/batchInferenceJobs", json=template)
    assert reply.status_code == 200, reply.text
    again = reply.json()
    assert again["name"] != fetched.name and again["state"] == "JOB_STATE_VALIDATING"
    assert again["model"] == LLAMA and again["inputDatasetId"] == fetched.input_dataset_id
    assert "estimatedCost" in _error(http.post("/batchInferenceJobs", json={**template, "estimatedCost": 3}))


def test_read_mask_is_honoured_on_get_and_list_and_accepted_in_the_upload_endpoint_body(client, http, ready, llama):
    assert http.get("/batchInferenceJobs/llama", params={"readMask": "name,jobProgress.percent"}).json() == {
        "name": f"accounts/{ACCOUNT}/batchInferenceJobs/llama", "jobProgress": {"percent": 100}}
    job = client.batch_inference_jobs.get("llama", read_mask="state")  # the SDK sends readMask=state
    assert job.state == "JOB_STATE_COMPLETED" and job.name is None
    listed = list(client.batch_inference_jobs.list(read_mask="name", filter="name=llama"))
    assert [j.model_dump(exclude_none=True) for j in listed] == [{"name": f"accounts/{ACCOUNT}/batchInferenceJobs/llama"}]
    masked = client.datasets.get(ready, read_mask="state,example_count")
    assert (masked.state, masked.example_count, masked.name, masked.display_name) == ("READY", "3", None, None)
    # Attributes, not model_dump: the SDK's model keeps the camelCase key beside its own.
    listed_datasets = list(client.datasets.list(read_mask="displayName", filter="name=in"))
    assert [(d.display_name, d.name, d.state) for d in listed_datasets] == [("the input", None, None)]
    client.datasets.create(dataset_id="signed", dataset={"user_uploaded": {}})
    urls = client.datasets.get_upload_endpoint("signed", filename_to_size={"a.jsonl": "10"}, read_mask="filenameToSignedUrls")
    assert set(urls.filename_to_signed_urls) == {"a.jsonl"}
    download = client.datasets.get_download_endpoint(ready, read_mask="filenameToSignedUrls")
    assert set(download.filename_to_signed_urls) == {"upload.jsonl"}
    assert "'colour' is not a field" in _error(http.get("/batchInferenceJobs/llama", params={"readMask": "colour"}))


def test_uploads_under_a_safe_name_and_validate_upload_is_idempotent(client, http):
    client.datasets.create(dataset_id="named", dataset={"user_uploaded": {}})
    stored = http.post("/datasets/named:upload", files={"file": ("my data.txt", LINES)})
    assert stored.status_code == 200 and stored.json()["filename"] == "my-data.txt.jsonl"
    assert client.datasets.get("named").state == "READY"
    # The two-step recipe after a one-step upload: :validateUpload on READY succeeds.
    assert client.datasets.validate_upload("named", body={})["state"] == "READY"
    assert http.post("/datasets/named:validateUpload", json={}).json()["exampleCount"] == "3"


def test_example_count_as_a_json_number(http):
    created = http.post("/datasets", json={"datasetId": "counted", "dataset": {"userUploaded": {}, "exampleCount": 3}})
    assert created.status_code == 200 and created.json()["exampleCount"] == "3"
    patched = http.patch("/datasets/counted", json={"exampleCount": 4})
    assert patched.status_code == 200 and patched.json()["exampleCount"] == "4"


def test_snake_case_query_parameters_work_and_none_is_silently_ignored(http, client, ready, llama):
    reply = http.post("/batchInferenceJobs", params={"batch_inference_job_id": "snake"},
                      json={"model": "scripted", "inputDatasetId": ready})
    assert reply.status_code == 200 and reply.json()["name"].endswith("/snake")
    page = http.get("/batchInferenceJobs", params={"page_size": 1, "order_by": "create_time desc"}).json()
    assert len(page["batchInferenceJobs"]) == 1 and page["nextPageToken"]
    assert page["batchInferenceJobs"][0]["name"].endswith("/snake")
    after = http.get("/batchInferenceJobs", params={"page_size": 1, "page_token": page["nextPageToken"],
                                                    "order_by": "create_time desc"}).json()
    assert after["batchInferenceJobs"][0]["name"] != page["batchInferenceJobs"][0]["name"]
    lineage = http.get("/datasets/llama-output:getDownloadEndpoint", params={"download_lineage": "true"}).json()
    assert any(name.startswith("in-") for name in lineage["filenameToSignedUrls"])
    assert "unknown query parameter 'pagesize'" in _error(http.get("/batchInferenceJobs", params={"pagesize": 1}))
    assert "unknown query parameter 'force'" in _error(http.delete("/batchInferenceJobs/snake", params={"force": "true"}))


# ---------------------------------------------------------------------------- lists


def test_job_list_filter_and_order(client, ready, llama):
    for job_id, display in (("list-a", "alpha one"), ("list-b", "beta"), ("list-c", "alpha two")):
        client.batch_inference_jobs.create(batch_inference_job_id=job_id, model="scripted", input_dataset_id=ready,
                                           display_name=display)
    for job_id in ("list-a", "list-b", "list-c"):
        wait_job(client, job_id, timeout=120)

    def names(**kwargs) -> list[str]:
        return [job.name.rsplit("/", 1)[-1] for job in client.batch_inference_jobs.list(**kwargs)]

    assert names(filter='displayName:"alpha"', order_by="displayName DESC") == ["list-c", "list-a"]
    assert names(filter='displayName="alpha*" AND NOT displayName:two') == ["list-a"]
    assert names(filter="(displayName:beta OR displayName:two) AND state=JOB_STATE_COMPLETED",
                 order_by="createTime desc") == ["list-c", "list-b"]
    # "llama" and the job posted back from its GET body.
    same_model = names(filter=f'model="{LLAMA}" AND inputDatasetId=in AND createTime>"2020-01-01T00:00:00Z"')
    assert len(same_model) == 2 and same_model[0] == "llama"
    assert names(filter="state=JOB_STATE_PAUSED") == []  # a Fireworks state raybatch never reaches
    with pytest.raises(fireworks.BadRequestError) as refused:
        list(client.batch_inference_jobs.list(filter="cost>3"))
    text = str(refused.value)  # the body's repr: its quotes come escaped
    assert "unsupported filter" in text and "unknown field" in text and "AND, OR, NOT and parentheses" in text


def test_dataset_list_honours_filter_and_order(client):
    def names(**kwargs) -> list[str]:
        return [d.name.rsplit("/", 1)[-1] for d in client.datasets.list(**kwargs)]

    assert names(filter='name="in" OR name="named"', order_by="name desc") == ["named", "in"]
    assert "in" not in names(filter="state=UPLOADING")
    assert names(filter="state=STATE_UNSPECIFIED") == []
    outputs = names(filter="state=READY AND sourceJobName:*", order_by="name")
    assert "llama-output" in outputs and "in" not in outputs and outputs == sorted(outputs)
    with pytest.raises(fireworks.BadRequestError, match="unsupported orderBy"):
        list(client.datasets.list(order_by="name sideways"))
