"""Issue 10, item 11: rows that would cost far more engine time than their bytes show
(huge max_tokens, n, top_logprobs, json_schema) are error rows with their own codes,
and many poison rows cannot restart engines row after row. Jobs through the running
service's HTTP API, with the service's default bounds."""

from __future__ import annotations

import json
import os
import time

import httpx

from raybatch.config import EngineConfig, RunConfig
from tests.helpers import InputBuilder, check_run, dataset_files_url, read_jsonl

ACCOUNT = "expensive"
BOUNDS = RunConfig.model_fields  # the service runs with the defaults
MAX_TOKENS = BOUNDS["max_output_tokens"].default
MAX_N = BOUNDS["max_n"].default
MAX_TOP = BOUNDS["max_top_logprobs"].default
MAX_SCHEMA = BOUNDS["max_json_schema_bytes"].default
FAILURE_BUDGET = EngineConfig.model_fields["max_engine_failures_per_job"].default


def _call(service, key, method, path, **kwargs) -> httpx.Response:
    return httpx.request(method, f"{service.base_url}/v1/accounts/{ACCOUNT}/{path}",
                         headers={"Authorization": f"Bearer {key}"}, timeout=120, **kwargs)


def _run(service, key, job_id: str, built: InputBuilder, model: str = "scripted", timeout: float = 240) -> dict:
    data = b"".join(b"".join(lines) for lines in built.shards.values())
    assert _call(service, key, "POST", "datasets", json={"datasetId": job_id, "dataset": {"userUploaded": {}}}).status_code == 200
    assert _call(service, key, "POST", f"datasets/{job_id}:upload", files={"file": ("in.jsonl", data)}).status_code == 200
    created = _call(service, key, "POST", "batchInferenceJobs", params={"batchInferenceJobId": job_id},
                    json={"model": model, "inputDatasetId": job_id})
    assert created.status_code == 200, created.text
    deadline = time.monotonic() + timeout
    while (job := _call(service, key, "GET", f"batchInferenceJobs/{job_id}").json())["state"] not in (
            "JOB_STATE_COMPLETED", "JOB_STATE_FAILED", "JOB_STATE_CANCELLED", "JOB_STATE_EXPIRED"):
        assert time.monotonic() < deadline, f"{job_id} is still {job['state']}"
        time.sleep(0.5)
    return job


def chat(text: str, **body) -> dict:
    return {"messages": [{"role": "user", "content": text}], **body}


def test_rows_over_the_jobs_bounds_are_error_rows_with_their_own_codes(service):
    key = service.key(ACCOUNT)
    huge_schema = {"type": "object", "properties": {f"p{i}": {"type": "string", "description": "x" * 100} for i in range(400)}}
    assert MAX_SCHEMA < len(json.dumps(huge_schema)) < 1 << 20  # within the line limit, over the schema bound
    built = InputBuilder()
    built.ok("in.jsonl", "fine", chat("fine", max_tokens=MAX_TOKENS, n=MAX_N, logprobs=True, top_logprobs=MAX_TOP))
    over = {
        "tokens": (chat("a", max_tokens=MAX_TOKENS * 100), "max_tokens_too_large"),
        "completion-tokens": (chat("a", max_completion_tokens=MAX_TOKENS + 1), "max_tokens_too_large"),
        "min-tokens": (chat("a", min_tokens=MAX_TOKENS + 1, ignore_eos=True), "max_tokens_too_large"),
        "n": (chat("a", n=MAX_N + 1), "n_too_large"),
        "logprobs": (chat("a", logprobs=True, top_logprobs=20), "logprobs_too_large"),
        "schema": (chat("a", response_format={"type": "json_schema", "json_schema": {"name": "s", "schema": huge_schema}}),
                   "json_schema_too_large"),
    }
    for custom_id, (body, code) in over.items():
        built.add("in.jsonl", {"custom_id": custom_id, "body": body}, custom_id, code)
    built.add("in.jsonl", {"custom_id": "completion-logprobs", "url": "/v1/completions",
                           "body": {"prompt": "a", "logprobs": 20}}, "completion-logprobs", "logprobs_too_large")
    job = _run(service, key, "bounds", built)
    assert job["state"] == "JOB_STATE_COMPLETED", job["status"]
    output = dataset_files_url(service.storage, ACCOUNT, job["outputDatasetId"])
    check_run(output, built.expected, progress=job["jobProgress"])
    errors = {row["custom_id"]: row["error"] for row in read_jsonl(f"{output}/errors.jsonl")}
    assert errors["n"]["message"] == f"n must be at most {MAX_N}; this request asks for {MAX_N + 1}"
    assert errors["tokens"]["message"] == (
        f"max_tokens must be at most {MAX_TOKENS}, this job's limit; this request asks for {MAX_TOKENS * 100}")
    assert errors["schema"]["message"].startswith("json_schema is ") and f"over this job's limit of {MAX_SCHEMA}" in errors["schema"]["message"]
    [fine] = read_jsonl(f"{output}/results.jsonl")
    assert len(fine["response"]["body"]["choices"]) == MAX_N


def test_many_poison_rows_cause_at_most_the_jobs_engine_failures(service, faults):
    """20 rows that kill every engine answering them, among 20 good ones: the job's
    rows cause at most max_engine_failures_per_job engine failures (not 2-3 per poison
    row), then its unanswered rows are engine_error rows; every line is in exactly one
    file and the job completes."""
    key = service.key(ACCOUNT)
    built = InputBuilder()
    for i in range(40):
        custom_id = f"poison-{i}" if i % 2 else f"good-{i}"
        # Outcomes vary with the order the engine meets them: checked below, not here.
        built.add("in.jsonl", {"custom_id": custom_id, "body": chat(f"line {i}")}, custom_id)
    faults.arm("engine.poison", custom_id_prefix="poison-", fault="die")
    job = _run(service, key, "poison", built)
    assert job["state"] == "JOB_STATE_COMPLETED", job["status"]
    output = dataset_files_url(service.storage, ACCOUNT, job["outputDatasetId"])
    failures = os.listdir(os.path.join(output, "_raybatch", "engine-failures"))
    assert 1 <= len(failures) <= FAILURE_BUDGET, failures
    results = {row["custom_id"] for row in read_jsonl(f"{output}/results.jsonl")}
    errors = {row["custom_id"]: row["error"] for row in read_jsonl(f"{output}/errors.jsonl")}
    assert len(results) + len(errors) == 40 and not results & set(errors)  # every line once
    assert all(custom_id.startswith("good-") for custom_id in results)  # no poison row was answered
    assert {row["code"] for row in errors.values()} == {"engine_error"}
    spent = [e for e in errors.values() if e["message"].startswith("this job's requests were all the engine had in flight")]
    assert spent and f"max_engine_failures_per_job {FAILURE_BUDGET}" in spent[0]["message"]
    assert job["jobProgress"]["failedRequests"] == len(errors) and job["jobProgress"]["successfullyProcessedRequests"] == len(results)
