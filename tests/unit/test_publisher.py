"""The scheduler publishes result files off its loop (`jobs/publishing.Publisher`):
while one job's publish runs, another job's transition goes ahead; the job whose files
are publishing keeps its stored state until a later pass finds the publish done."""

from __future__ import annotations

import threading
import time
from datetime import datetime, timezone

import pytest

from raybatch.config import ServiceConfig
from raybatch.jobs.publishing import Publisher
from raybatch.jobs.scheduler import JobScheduler
from raybatch.resources import BatchInferenceJob, JobRecord, JobRuntime, JobState
from raybatch.store import Store


def wait_for(condition, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_published_is_false_while_running_true_once_then_starts_again():
    gate, calls, woken = threading.Event(), [], []

    def publish(location):
        calls.append(location.url)
        gate.wait(10)

    publisher = Publisher(lambda: woken.append(1), publish=publish)
    assert not publisher.published("/tmp/out-a")  # started
    assert not publisher.published("/tmp/out-a")  # still running: not started twice
    gate.set()
    wait_for(lambda: woken)  # the loop is woken when it ends
    assert publisher.published("/tmp/out-a")
    assert calls == ["/tmp/out-a"]
    assert not publisher.published("/tmp/out-a")  # asked again: a new publish (idempotent)
    publisher.shutdown()


def test_a_failed_publish_raises_once_and_is_tried_again():
    attempts = []

    def publish(location):
        attempts.append(1)
        if len(attempts) == 1:
            raise OSError("storage down")

    publisher = Publisher(lambda: None, publish=publish)
    assert not publisher.published("/tmp/out-b")
    wait_for(lambda: publisher._running["/tmp/out-b"].done())
    with pytest.raises(OSError):
        publisher.published("/tmp/out-b")
    assert not publisher.published("/tmp/out-b")
    wait_for(lambda: publisher._running["/tmp/out-b"].done())
    assert publisher.published("/tmp/out-b") and len(attempts) == 2
    publisher.shutdown()


class _Pool:
    class end_job:
        @staticmethod
        def remote(*args):
            pass


class _Configs:
    def __init__(self, root):
        self.root = root

    def files_url(self, dataset):
        return f"{self.root}/{dataset.rsplit('/', 1)[-1]}"


def test_another_jobs_transition_does_not_wait_for_a_publish(tmp_path):
    config = ServiceConfig(storage=str(tmp_path / "storage"))
    scheduler = object.__new__(JobScheduler)
    scheduler._config, scheduler._store, scheduler._lock = config, Store(config.storage), threading.RLock()
    scheduler._pool, scheduler._configs = _Pool(), _Configs(str(tmp_path / "outputs"))
    slow = threading.Event()

    def publish(location):
        if location.url.endswith("out-slow"):
            slow.wait(30)

    scheduler._publisher = Publisher(lambda: None, publish=publish)
    for job_id in ("slow", "quick"):
        job = BatchInferenceJob(name=f"accounts/a/batchInferenceJobs/{job_id}", state=JobState.WRITING_RESULTS,
                                create_time=datetime(2026, 1, 1, tzinfo=timezone.utc),
                                output_dataset_id=f"accounts/a/datasets/out-{job_id}")
        scheduler._store.put_job(JobRecord(job=job, runtime=JobRuntime(account="a")))

    def states():
        return {r.job.name.rsplit("/", 1)[-1]: r.job.state for r in scheduler._store.all_jobs()}

    def one_pass():
        started = time.monotonic()
        for record in sorted(scheduler._store.all_jobs(), key=lambda r: r.job.name, reverse=True):  # slow first
            scheduler._advance(record)
        return time.monotonic() - started

    assert one_pass() < 5  # the slow publish is started, not waited for
    wait_for(lambda: scheduler._publisher._running["/".join([str(tmp_path / "outputs"), "out-quick"])].done())
    assert one_pass() < 5
    assert states() == {"slow": JobState.WRITING_RESULTS, "quick": JobState.COMPLETED}
    slow.set()
    wait_for(lambda: scheduler._publisher._running[str(tmp_path / "outputs" / "out-slow")].done())
    one_pass()
    assert states() == {"slow": JobState.COMPLETED, "quick": JobState.COMPLETED}
    scheduler._publisher.shutdown()
