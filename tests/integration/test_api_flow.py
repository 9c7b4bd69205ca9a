"""The whole flow through the official `fireworks-ai` SDK against the real Serve app,
scheduler and vLLM CPU engine: both upload paths, the job through its states,
jobProgress equal to the files, list paging, download."""

from __future__ import annotations

import json

import httpx
import pytest

from tests.helpers import InputBuilder, chat, check_run, dataset_files_url, read_jsonl, sdk_client, wait_job

pytestmark = pytest.mark.engine  # one job on vLLM, shared by the module

ACCOUNT = "flow"


def _input() -> InputBuilder:
    built = InputBuilder()
    for i in range(6):
        built.ok("requests.jsonl", f"req-{i}", chat(f"say {i}", max_tokens=8, temperature=0))
    built.add("requests.jsonl", b"{not json", None, "invalid_json")
    built.ok("requests.jsonl", "req-0", chat("again", max_tokens=8))
    built.expected[-1].error = "duplicate_custom_id"
    return built


@pytest.fixture(scope="module")
def flow(service, tmp_path_factory):
    client = sdk_client(service.base_url, service.key(ACCOUNT), ACCOUNT)
    folder = tmp_path_factory.mktemp("flow")
    built = _input()
    built.write(str(folder))
    data = (folder / "requests.jsonl").read_bytes()

    # Path 1: one multipart request.
    client.datasets.create(dataset_id="direct", dataset={"display_name": "direct", "user_uploaded": {}})
    uploaded = client.datasets.upload("direct", file=("requests.jsonl", data))
    # Path 2: signed URLs, then validateUpload.
    client.datasets.create(dataset_id="signed", dataset={"user_uploaded": {}})
    urls = client.datasets.get_upload_endpoint("signed", filename_to_size={"requests.jsonl": str(len(data))})
    put = httpx.put(urls.filename_to_signed_urls["requests.jsonl"], content=data,
                    headers={"Content-Type": "application/octet-stream"})
    put.raise_for_status()
    client.datasets.validate_upload("signed", body={})

    job = client.batch_inference_jobs.create(
        batch_inference_job_id="flow-job",
        model="tiny",
        input_dataset_id=f"accounts/{ACCOUNT}/datasets/signed",
        display_name="flow",
        inference_parameters={"max_tokens": 8, "temperature": 0.0},
    )
    finished, seen = wait_job(client, "flow-job", timeout=600)
    return client, built, uploaded, job, finished, seen, data


def test_both_upload_paths_make_ready_datasets(flow):
    client, built, uploaded, *_ , data = flow
    assert uploaded.filename == "requests.jsonl" and uploaded.bytes == len(data)
    for dataset_id in ("direct", "signed"):
        dataset = client.datasets.get(dataset_id)
        assert dataset.state == "READY"
        assert dataset.example_count == str(len(built.expected))


def test_job_goes_through_its_states_to_completed(flow):
    _, _, _, created, finished, seen, _ = flow
    assert created.state == "JOB_STATE_VALIDATING"
    assert created.output_dataset_id == f"accounts/{ACCOUNT}/datasets/flow-job-output"
    assert finished.state == "JOB_STATE_COMPLETED", finished.status
    order = ["JOB_STATE_VALIDATING", "JOB_STATE_PENDING", "JOB_STATE_RUNNING",
             "JOB_STATE_WRITING_RESULTS", "JOB_STATE_COMPLETED"]
    # Polling may miss short states, never reorder them.
    assert seen == sorted(seen, key=order.index) and seen[-1] == "JOB_STATE_COMPLETED"
    assert "JOB_STATE_RUNNING" in seen


def test_job_progress_matches_the_output_files(flow, service):
    client, built, _, _, finished, _, _ = flow
    output = dataset_files_url(service.storage, ACCOUNT, finished.output_dataset_id)
    check_run(output, built.expected)
    results, errors = read_jsonl(f"{output}/results.jsonl"), read_jsonl(f"{output}/errors.jsonl")
    progress = finished.job_progress
    assert progress.percent == 100
    assert progress.total_input_requests == len(built.expected)
    assert progress.successfully_processed_requests == len(results) == 6
    assert progress.failed_requests == len(errors) == 2
    assert progress.output_tokens == sum(r["response"]["body"]["usage"]["completion_tokens"] for r in results)
    assert {r["response"]["body"]["model"] for r in results} == {"tiny"}  # the job's model name, not a path
    dataset = client.datasets.get("flow-job-output")
    assert dataset.state == "READY"
    assert dataset.source_job_name == f"accounts/{ACCOUNT}/batchInferenceJobs/flow-job"
    assert dataset.example_count == "8"


def test_download_gives_the_output_files_and_lineage(flow):
    client = flow[0]
    urls = client.datasets.get_download_endpoint("flow-job-output").filename_to_signed_urls
    assert sorted(urls) == ["errors.jsonl", "results.jsonl"]
    results = [json.loads(line) for line in httpx.get(urls["results.jsonl"]).text.splitlines()]
    assert sorted(r["custom_id"] for r in results) == [f"req-{i}" for i in range(6)]
    lineage = client.datasets.get_download_endpoint("flow-job-output", download_lineage=True)
    assert sorted(lineage.filename_to_signed_urls) == [
        "flow-job-output-errors.jsonl", "flow-job-output-results.jsonl", "signed-requests.jsonl"
    ]
    assert httpx.get(lineage.filename_to_signed_urls["signed-requests.jsonl"]).content == flow[-1]


def test_list_pages_one_at_a_time(flow):
    client = flow[0]
    first = client.datasets.list(page_size=1)
    assert len(first.datasets) == 1 and first.next_page_token
    names = [d.name for d in client.datasets.list(page_size=1)]  # the SDK follows the tokens
    assert sorted(names) == sorted(f"accounts/{ACCOUNT}/datasets/{n}" for n in ("direct", "signed", "flow-job-output"))
    jobs = list(client.batch_inference_jobs.list(page_size=1))
    assert [j.name for j in jobs] == [f"accounts/{ACCOUNT}/batchInferenceJobs/flow-job"]
