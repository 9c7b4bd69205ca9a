"""raybatch's Prometheus metrics, scraped from the exporter that `raybatch up
--metrics-port` opens (the `service` fixture starts the service so), before and after
a real job through the API: the counters move by what the job did."""

from __future__ import annotations

import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers import InputBuilder, chat, sdk_client, wait_job

pytestmark = pytest.mark.engine  # a job on vLLM (the warm tiny model)

ACCOUNT = "metrics"
JOB_ID = "metrics-job"


def scrape(service) -> list[tuple[str, dict, float]]:
    text = httpx.get(f"http://127.0.0.1:{service.metrics_port}/metrics", timeout=30).text
    return [(s.name, s.labels, s.value) for family in text_string_to_metric_families(text) for s in family.samples
            if s.name.startswith("ray_raybatch_")]


def total(samples, name: str, **match) -> float:
    """The sum over every process's series of `name` whose labels include `match`."""
    return sum(v for n, labels, v in samples if n == name and match.items() <= labels.items())


def test_counters_move_during_a_job(service, tmp_path):
    before = scrape(service)
    client = sdk_client(service.base_url, service.key(ACCOUNT), ACCOUNT)
    built = InputBuilder()
    for i in range(4):
        built.ok("requests.jsonl", f"req-{i}", chat(f"count to {i}", max_tokens=8, temperature=0))
    built.add("requests.jsonl", b"{not json", None, "invalid_json")
    built.write(str(tmp_path))
    client.datasets.create(dataset_id="metrics-input", dataset={"user_uploaded": {}})
    client.datasets.upload("metrics-input", file=("requests.jsonl", (tmp_path / "requests.jsonl").read_bytes()))
    client.batch_inference_jobs.create(batch_inference_job_id=JOB_ID, model="tiny",
                                       input_dataset_id=f"accounts/{ACCOUNT}/datasets/metrics-input")
    finished, _ = wait_job(client, JOB_ID, timeout=600)
    assert finished.state == "JOB_STATE_COMPLETED", finished.status

    job = {"job_id": JOB_ID, "account": ACCOUNT}

    def moved(name, **match):
        return total(after, name, **match) - total(before, name, **match)

    def missing() -> list[str]:
        """Every expected movement not yet seen in the last scrape."""
        expected = {
            "rows processed == 5": moved("ray_raybatch_rows_processed_total", **job) == 5,
            "invalid_json row": moved("ray_raybatch_rows_failed_total", code="invalid_json", **job) == 1,
            "input tokens": moved("ray_raybatch_input_tokens_total", account=ACCOUNT) > 0,
            "output tokens": moved("ray_raybatch_output_tokens_total", account=ACCOUNT) > 0,
            "committed bytes": moved("ray_raybatch_committed_bytes_total", account=ACCOUNT) > 0,
            "commit latency": moved("ray_raybatch_commit_latency_seconds_count") >= 1,
            "time to first row": moved("ray_raybatch_time_to_first_row_seconds_count") >= 1,
            "COMPLETED transition": moved("ray_raybatch_job_state_changes_total", state="JOB_STATE_COMPLETED") >= 1,
            "job create 200": moved("ray_raybatch_api_requests_total",
                                    route="/v1/accounts/{account}/batchInferenceJobs", status="200") >= 1,
            # The warm tiny replica, and this job's in-flight series (now back at 0).
            "ready tiny replica": total(after, "ray_raybatch_engine_replicas", model="tiny", state="ready") >= 1,
            "job's in-flight series": any(n == "ray_raybatch_rows_in_flight" and l.get("job_id") == JOB_ID
                                          for n, l, _ in after),
            "tiny queue depth": any(n == "ray_raybatch_queue_depth" and l.get("model") == "tiny" for n, l, _ in after),
            "jobs gauge": any(n == "ray_raybatch_jobs" for n, _, _ in after),
        }
        return [name for name, seen in expected.items() if not seen]

    # Each process (API replica, scheduler, writer) reports to its node's agent every few
    # seconds, each on its own clock: wait until every one of them has been exported.
    deadline = time.monotonic() + 60
    after = scrape(service)
    while missing() and time.monotonic() < deadline:
        time.sleep(2)
        after = scrape(service)
    assert not missing(), (missing(), sorted({n for n, _, _ in after}))
