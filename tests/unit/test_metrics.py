"""raybatch/metrics.py, the API's request counter and the structured log lines, without
Ray: the recorded values go to fakes. tests/integration/test_metrics.py scrapes the real
exporter during a job."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from ray.util.metrics import Counter, Histogram

from raybatch import metrics
from raybatch.api.request_metrics import RequestMetrics
from raybatch.events import EVENTS, log_job_state
from raybatch.jobs.driver_control import DriverControl
from raybatch.output_layout import PartCommit

ROOT = Path(__file__).resolve().parents[2]


class FakeMetric:
    def __init__(self):
        self.values: dict[tuple, float] = {}

    def _key(self, tags):
        return tuple(sorted((tags or {}).items()))

    def inc(self, value=1.0, tags=None):
        self.values[self._key(tags)] = self.values.get(self._key(tags), 0) + value

    def set(self, value, tags=None):
        self.values[self._key(tags)] = value

    def observe(self, value, tags=None):
        self.values.setdefault(self._key(tags), []).append(value)


@pytest.fixture
def recorded(monkeypatch):
    fakes: dict[str, FakeMetric] = {}
    monkeypatch.setattr(metrics, "metric", lambda name: fakes.setdefault(name, FakeMetric()))
    for gauges in ("_jobs", "_replicas", "_queues", "_in_flight"):
        monkeypatch.setattr(metrics, gauges, metrics.GaugeSet(getattr(metrics, gauges)._name))
    return fakes


def labels(**tags):
    return tuple(sorted(tags.items()))


def test_every_metric_the_dashboard_queries_is_defined_with_its_labels():
    exported = {}
    for made in metrics._metrics().values():
        name = "ray_" + made.info["name"]
        suffixes = ["_total"] if isinstance(made, Counter) else ["_bucket", "_sum", "_count"] if isinstance(made, Histogram) else [""]
        for suffix in suffixes:
            exported[name + suffix] = set(made.info["tag_keys"]) | ({"le"} if suffix == "_bucket" else set())
    dashboard = (ROOT / "cluster/grafana-dashboard.json").read_text()
    assert dashboard == (ROOT / "helm/raybatch/files/grafana-dashboard.json").read_text()
    queries = [t["expr"] for p in json.loads(dashboard)["panels"] for t in p.get("targets", [])]
    assert queries
    for query in queries:
        for name in re.findall(r"ray_raybatch_\w+", query):
            assert name in exported, (name, query)
            for by in re.findall(r"by \(([^)]*)\)", query):
                assert {b.strip() for b in by.split(",")} <= exported[name], query


def test_a_commit_counts_rows_error_codes_tokens_and_bytes(recorded):
    commit = PartCommit(seq=1, results_file="r", errors_file="e", lines={}, error_lines={}, results=3, errors=2,
                        bytes=400, prompt_tokens=30, completion_tokens=12, cached_tokens=0, committed_at=0.0)
    errors = [json.dumps({"error": {"code": "invalid_json"}}).encode(), b"not json"]
    job = metrics.job_labels("job-1", "acme")
    metrics.record_commit(job, commit, errors, 0.02)
    assert recorded["rows_processed"].values == {labels(job_id="job-1", account="acme"): 5}
    assert recorded["rows_failed"].values == {
        labels(job_id="job-1", account="acme", code="invalid_json"): 1,
        labels(job_id="job-1", account="acme", code="unknown"): 1,
    }
    assert recorded["input_tokens"].values == {labels(account="acme"): 30}
    assert recorded["output_tokens"].values == {labels(account="acme"): 12}
    assert "cached_tokens" not in recorded  # a counter cannot be increased by 0
    assert recorded["committed_bytes"].values == {labels(account="acme"): 400}
    assert recorded["commit_latency"].values == {(): [0.02]}
    assert metrics.job_labels(None, "local") == {"job_id": "raybatch-run", "account": "local"}


def test_jobs_by_state_drop_to_zero_when_no_job_is_left_in_a_state(recorded):
    metrics.count_jobs(["JOB_STATE_RUNNING", "JOB_STATE_RUNNING", "JOB_STATE_PENDING"])
    metrics.count_jobs(["JOB_STATE_RUNNING"])
    assert recorded["jobs"].values == {labels(state="JOB_STATE_RUNNING"): 1, labels(state="JOB_STATE_PENDING"): 0}


def test_precision_label_names_what_the_replica_runs():
    assert metrics.precision_label({}) == "default"
    assert metrics.precision_label({"dtype": "bfloat16"}) == "bfloat16"
    assert metrics.precision_label({"quantization": "fp8", "kv_cache_dtype": "fp8"}) == "fp8+fp8-kv"


def _pool_model(served: str, engine_args: dict):
    spec = SimpleNamespace(model="/models/x", key=f"key-{served}", engine_args=engine_args)
    return SimpleNamespace(spec=spec, served_name=served)


def test_the_pool_reports_replicas_queues_and_rows_in_flight_per_job(recorded):
    row = lambda run: SimpleNamespace(row=SimpleNamespace(run_id=run))  # noqa: E731
    ready = SimpleNamespace(state="ready", in_flight={1: row("r1"), 2: row("r1"), 3: row("r2")})
    starting = SimpleNamespace(state="starting", in_flight={})
    state = SimpleNamespace(served_names={"tiny"}, pool_model=_pool_model("tiny", {"dtype": "bfloat16"}),
                            queue=[1, 2, 3], suspects=[4], replicas=[ready, starting])
    run = lambda job, account: SimpleNamespace(ticket=SimpleNamespace(job_id=job, account=account), model="key-tiny")  # noqa: E731
    # r3: registered, none of its rows inside an engine yet: its series is there, at 0.
    runs = {"r1": run("j1", "a"), "r2": run("", "b"), "r3": run("j3", "a")}
    metrics.report_pool([state], runs)
    assert recorded["engine_replicas"].values == {
        labels(model="tiny", precision="bfloat16", state="ready"): 1,
        labels(model="tiny", precision="bfloat16", state="starting"): 1,
    }
    assert recorded["queue_depth"].values == {labels(model="tiny"): 4}
    assert recorded["rows_in_flight"].values == {
        labels(job_id="j1", account="a", model="tiny"): 2, labels(job_id="raybatch-run", account="b", model="tiny"): 1,
        labels(job_id="j3", account="a", model="tiny"): 0,
    }
    state.replicas, state.queue, state.suspects = [], [], []  # the jobs ended, the replicas stopped
    metrics.report_pool([state], {})
    assert set(recorded["rows_in_flight"].values.values()) == {0}
    assert set(recorded["engine_replicas"].values.values()) == {0}
    metrics.report_pool([None], runs)  # never raises: the pool's watcher must live on


def test_api_requests_are_counted_by_route_template_and_status(monkeypatch):
    counted = []
    monkeypatch.setattr(metrics, "count_request", lambda *args: counted.append(args))
    app = FastAPI()
    app.add_middleware(RequestMetrics)

    @app.get("/v1/accounts/{account}/datasets/{dataset_id}")
    def get_dataset(account: str, dataset_id: str):
        return {"ok": True}

    client = TestClient(app)
    client.get("/v1/accounts/acme/datasets/d1")
    client.get("/v1/accounts/acme/datasets/d2")
    client.get("/nowhere/x")
    assert counted == [
        ("/v1/accounts/{account}/datasets/{dataset_id}", "GET", 200),
        ("/v1/accounts/{account}/datasets/{dataset_id}", "GET", 200),
        ("unmatched", "GET", 404),
    ]


def test_a_job_state_change_is_one_json_line_with_job_account_and_attempt():
    job = SimpleNamespace(name="accounts/acme/batchInferenceJobs/job-1", state=SimpleNamespace(value="JOB_STATE_RUNNING"))
    record = SimpleNamespace(job=job, runtime=SimpleNamespace(account="acme", attempts=2, driver_id="raybatch-acme-job-1-2-ab"))
    lines = []
    handler = logging.Handler()
    handler.emit = lambda r: lines.append(r.getMessage())
    EVENTS.addHandler(handler)
    try:
        log_job_state(record, "JOB_STATE_PENDING", "attempt 2")
    finally:
        EVENTS.removeHandler(handler)
    (line,) = lines
    assert json.loads(line) == {
        "event": "job_state", "job_id": "job-1", "account": "acme", "attempt": 2, "source": "JOB_STATE_PENDING",
        "state": "JOB_STATE_RUNNING", "message": "attempt 2", "driver": "raybatch-acme-job-1-2-ab",
    }


def test_a_driver_ray_job_carries_its_batch_job_in_its_metadata():
    submitted = []
    control = DriverControl()
    control._client = SimpleNamespace(submit_job=lambda **kwargs: submitted.append(kwargs))
    control.submit("raybatch-acme-job-1-1-abc", storage="/s", account="acme", job_id="job-1", attempt=1)
    control.submit_spare("raybatch-spare-1", storage="/s", idle_seconds=60)
    assert submitted[0]["metadata"] == {"raybatch_job_id": "job-1", "raybatch_account": "acme", "raybatch_attempt": "1"}
    assert submitted[1]["metadata"] == {"raybatch_spare": "true"}
