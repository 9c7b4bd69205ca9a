"""Issue 10, item 6: per-account quotas and per-key rate limits, without Ray: the
checks on a real store, the dataset routes' logic, the scheduler's create and
admission, and the token bucket on a fake clock."""

from __future__ import annotations

import gzip
import io
import threading

import pytest

from raybatch.api.datasets import DatasetService
from raybatch.api.rate_limit import RateLimiter, TokenBucket
from raybatch.config import ServiceConfig
from raybatch.exceptions import PayloadTooLarge, QuotaExceeded, RateLimited
from raybatch.jobs.run_config import RunConfigBuilder
from raybatch.jobs.scheduler import JobScheduler
from raybatch.quotas import AccountQuotas, stored_bytes
from raybatch.resources import CreateJobRequest, DatasetFields, DatasetState, JobState
from raybatch.store import Store
from tests.unit.test_admission import pending, scheduler_with

LINE = b'{"custom_id": "a", "body": {"messages": [{"role": "user", "content": "hi"}]}}\n'


def service(tmp_path, **settings) -> tuple[ServiceConfig, Store, DatasetService]:
    config = ServiceConfig(storage=str(tmp_path / "storage"), models={"m": {"source": "scripted"}}, **settings)
    store = Store(config.storage)
    return config, store, DatasetService(store, config)


def ready_dataset(datasets: DatasetService, account: str, dataset_id: str, data: bytes = LINE) -> None:
    datasets.create(account, dataset_id, DatasetFields(), "k")
    datasets.upload(account, dataset_id, "in.jsonl", io.BytesIO(data))


# ----------------------------------------------------------------- the quotas


def test_account_quotas_override_the_service_wide_ones():
    config = ServiceConfig(max_datasets_per_account=7, account_quotas={"big": {"max_datasets": 70, "request_burst": 3}})
    assert config.quota("big").max_datasets == 70 and config.quota("big").request_burst == 3
    assert config.quota("big").max_queued_jobs == 100  # not overridden: the service's
    assert config.quota("other").max_datasets == 7
    default = ServiceConfig().quota("x")
    assert (default.max_datasets, default.max_stored_bytes, default.max_queued_jobs, default.max_running_jobs,
            default.requests_per_second, default.request_burst) == (1000, 50 << 30, 100, 4, 20.0, 100)


def test_the_dataset_quota_refuses_one_more_and_frees_on_delete(tmp_path):
    _, _, datasets = service(tmp_path, max_datasets_per_account=2)
    datasets.create("acme", "one", DatasetFields(), "k")
    datasets.create("acme", "two", DatasetFields(), "k")
    with pytest.raises(QuotaExceeded) as refused:
        datasets.create("acme", "three", DatasetFields(), "k")
    assert refused.value.http_status == 429 and refused.value.status == "RESOURCE_EXHAUSTED"
    assert refused.value.message == (
        "account acme has 2 datasets, its quota of 2 (output datasets of jobs count); delete datasets it no longer needs")
    datasets.create("globex", "one", DatasetFields(), "k")  # another account's quota is its own
    datasets.delete("acme", "one")
    datasets.create("acme", "three", DatasetFields(), "k")


def test_stored_bytes_count_ready_datasets_expanded_and_uploads_as_received(tmp_path):
    _, store, datasets = service(tmp_path)
    ready_dataset(datasets, "acme", "zipped", gzip.compress(LINE * 100))
    datasets.create("acme", "half", DatasetFields(), "k")
    store.dataset_files("acme", "half").write_atomic("part.jsonl", LINE * 3)
    assert stored_bytes(store, "acme") == len(LINE) * 100 + len(LINE) * 3
    assert stored_bytes(store, "acme", leave_out="half") == len(LINE) * 100


def test_an_upload_past_the_stored_bytes_quota_is_refused_and_leaves_nothing(tmp_path):
    _, store, datasets = service(tmp_path, max_stored_bytes_per_account=len(LINE) * 10)
    ready_dataset(datasets, "acme", "first", LINE * 6)
    datasets.create("acme", "second", DatasetFields(), "k")
    with pytest.raises(QuotaExceeded) as refused:
        datasets.upload("acme", "second", "in.jsonl", io.BytesIO(LINE * 5))
    assert refused.value.message == (
        f"account acme would store more than its quota of {len(LINE) * 10} bytes: this dataset needs "
        f"{len(LINE) * 5}, {len(LINE) * 4} are left; delete datasets it no longer needs")
    assert store.dataset_files("acme", "second").list() == []
    assert datasets.get("acme", "second").state == DatasetState.UPLOADING
    datasets.upload("acme", "second", "in.jsonl", io.BytesIO(LINE * 4))  # what fits is taken


def test_registering_files_past_the_quota_is_refused(tmp_path):
    _, _, datasets = service(tmp_path, max_stored_bytes_per_account=1000)
    datasets.create("acme", "d", DatasetFields(), "k")
    with pytest.raises(QuotaExceeded):
        datasets.upload_plan("acme", "d", {"a.jsonl": 600, "b.jsonl": 401}, "k")
    assert datasets.upload_plan("acme", "d", {"a.jsonl": 1000}, "k")[1] == {"a.jsonl": 1000}


def test_validation_counts_what_gzip_expands_to_against_the_quota(tmp_path):
    """A small gzip fits the bytes received but not what it stands for: 429 at
    validation (the dataset limit is not passed: not 413), the dataset stays UPLOADING."""
    _, store, datasets = service(tmp_path, max_stored_bytes_per_account=len(LINE) * 50)
    datasets.create("acme", "d", DatasetFields(), "k")
    packed = gzip.compress(LINE * 1000)
    assert len(packed) < len(LINE) * 50
    store.dataset_files("acme", "d").write_atomic("in.jsonl", packed)
    with pytest.raises(QuotaExceeded) as refused:
        datasets.validate("acme", "d")
    assert "would store more than its quota" in refused.value.message
    assert datasets.get("acme", "d").state == DatasetState.UPLOADING


def test_the_dataset_limit_still_answers_413_before_the_quota(tmp_path):
    _, _, datasets = service(tmp_path, max_dataset_bytes=100, max_stored_bytes_per_account=1000)
    datasets.create("acme", "d", DatasetFields(), "k")
    with pytest.raises(PayloadTooLarge):
        datasets.upload("acme", "d", "in.jsonl", io.BytesIO(LINE * 2))


# ------------------------------------------------------------- the scheduler


def scheduler(tmp_path, **settings) -> tuple[JobScheduler, DatasetService]:
    config, store, datasets = service(tmp_path, **settings)
    made = object.__new__(JobScheduler)
    made._config, made._store, made._lock = config, store, threading.RLock()
    made._configs = RunConfigBuilder(config, store, "pool")
    made._quotas = AccountQuotas(store, config)
    return made, datasets


def create(made: JobScheduler, job_id: str, account: str = "acme") -> dict:
    return made.create_job(account, job_id, CreateJobRequest(model="m", input_dataset_id="in"), "k")


def test_jobs_waiting_to_run_are_capped_per_account(tmp_path):
    made, datasets = scheduler(tmp_path, max_queued_jobs_per_account=2)
    ready_dataset(datasets, "acme", "in")
    ready_dataset(datasets, "globex", "in")
    create(made, "one"), create(made, "two")
    with pytest.raises(QuotaExceeded) as refused:
        create(made, "three")
    assert refused.value.message == (
        "account acme has 2 jobs waiting to run, its quota of 2; create more once some have started or ended, "
        "or cancel some")
    assert made._store.get_job("acme", "three") is None and made._store.get_dataset("acme", "three-output") is None
    create(made, "other", account="globex")
    record = made._store.get_job("acme", "one")
    record.job.state = JobState.RUNNING  # started: no longer waiting
    made._store.put_job(record)
    create(made, "three")


def test_a_job_needs_room_for_its_output_dataset(tmp_path):
    made, datasets = scheduler(tmp_path, max_datasets_per_account=2)
    ready_dataset(datasets, "acme", "in")
    create(made, "one")  # its output is the second dataset
    with pytest.raises(QuotaExceeded, match="has 2 datasets, its quota of 2"):
        create(made, "two")
    made._store.delete_dataset("acme", "one-output")
    create(made, "two")


def test_no_new_job_while_the_stored_bytes_quota_is_full(tmp_path):
    made, datasets = scheduler(tmp_path, max_stored_bytes_per_account=len(LINE) * 2)
    ready_dataset(datasets, "acme", "in")
    create(made, "one")
    output = made._store.get_dataset("acme", "one-output")  # the job ended with its output stored
    output.state, output.size_bytes = DatasetState.READY, str(len(LINE))
    made._store.put_dataset("acme", "one-output", output)
    with pytest.raises(QuotaExceeded, match=f"stores {len(LINE) * 2} bytes, its quota of {len(LINE) * 2}, and a job"):
        create(made, "two")


def test_admission_uses_the_accounts_own_running_quota(tmp_path):
    jobs = [("big", f"big-{n}") for n in range(4)] + [("small", f"small-{n}") for n in range(4)]
    made, started = scheduler_with(tmp_path, jobs, max_running_jobs=8, max_running_jobs_per_account=1,
                                   account_quotas={"big": {"max_running_jobs": 3}})
    made._admit(pending(made))
    assert sorted(started) == ["big-0", "big-1", "big-2", "small-0"]


# ------------------------------------------------------------- rate limits


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_key_gets_its_burst_then_its_rate_and_a_retry_after():
    clock = Clock()
    limiter = RateLimiter(ServiceConfig(requests_per_second_per_key=2, request_burst_per_key=5), clock)
    for _ in range(5):
        limiter.check("k1", "acme")
    with pytest.raises(RateLimited) as refused:
        limiter.check("k1", "acme")
    assert (refused.value.http_status, refused.value.status, refused.value.retry_after) == (429, "RESOURCE_EXHAUSTED", 1)
    assert refused.value.message == "API key k1 sent more than 2 requests per second (bursts of 5); retry after 1s"
    limiter.check("k2", "acme")  # each key has its own bucket
    clock.now += 0.5  # one request's worth refilled
    limiter.check("k1", "acme")
    with pytest.raises(RateLimited):
        limiter.check("k1", "acme")
    clock.now += 60  # idle: full again, never more than the burst
    for _ in range(5):
        limiter.check("k1", "acme")
    with pytest.raises(RateLimited):
        limiter.check("k1", "acme")


def test_retry_after_is_whole_seconds_until_the_next_token():
    bucket = TokenBucket(rate=0.1, burst=1)
    assert bucket.take(bucket.updated) == 0
    assert bucket.take(bucket.updated + 2) == pytest.approx(8)  # 0.2 of a token there: 8 s to go
    clock = Clock()
    limiter = RateLimiter(ServiceConfig(account_quotas={"slow": {"requests_per_second": 0.1, "request_burst": 1}}), clock)
    limiter.check("k", "slow")
    with pytest.raises(RateLimited) as refused:
        limiter.check("k", "slow")
    assert refused.value.retry_after == 10


def test_the_wire_format_of_a_refusal_carries_retry_after():
    import json

    from raybatch.api.errors import error_response

    limited = error_response(RateLimited("slow down", retry_after=3))
    assert limited.status_code == 429 and limited.headers["retry-after"] == "3"
    assert json.loads(limited.body) == {"code": 8, "message": "slow down", "details": [],
                                        "error": {"code": 429, "message": "slow down", "status": "RESOURCE_EXHAUSTED"}}
    full = error_response(QuotaExceeded("full"))
    assert full.status_code == 429 and "retry-after" not in full.headers
