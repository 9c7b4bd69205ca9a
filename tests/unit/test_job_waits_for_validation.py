"""A job created right after its upload, while the dataset still validates in the
background, waits in VALIDATING (JobScheduler._validate) instead of failing; once the
validation has stopped answering, it fails with the not-READY message."""

from __future__ import annotations

import threading
import time

from raybatch.api.validation import ValidationRecord, validation_path
from raybatch.config import ServiceConfig
from raybatch.jobs.scheduler import JobScheduler
from raybatch.resources import BatchInferenceJob, Dataset, JobRecord, JobRuntime, JobState
from raybatch.store import Store


class NoPool:
    class end_job:  # noqa: N801 - stands in for an actor method
        @staticmethod
        def remote(*args):
            pass


def scheduler_and_job(tmp_path, heartbeat_age: float) -> tuple[JobScheduler, JobRecord]:
    config = ServiceConfig(storage=str(tmp_path / "storage"), validation_stale_seconds=30)
    scheduler = object.__new__(JobScheduler)
    scheduler._config, scheduler._store, scheduler._lock = config, Store(config.storage), threading.RLock()
    scheduler._pool = NoPool()
    store = scheduler._store
    store.put_dataset("acme", "big", Dataset(name="accounts/acme/datasets/big"))  # UPLOADING
    beat = time.time() - heartbeat_age
    record = ValidationRecord(run_id="r1", started=beat, heartbeat=beat, phase="lines")
    store.location.write_atomic(validation_path("acme", "big"), record.model_dump_json().encode())
    job = JobRecord(
        job=BatchInferenceJob(name="accounts/acme/batchInferenceJobs/j1", state=JobState.VALIDATING,
                              model="m", input_dataset_id="accounts/acme/datasets/big"),
        runtime=JobRuntime(account="acme"),
    )
    store.put_job(job, new=True)
    return scheduler, job


def test_a_job_waits_while_its_input_validates(tmp_path):
    scheduler, job = scheduler_and_job(tmp_path, heartbeat_age=1)
    scheduler._validate(job)
    assert scheduler._store.get_job("acme", "j1").job.state == JobState.VALIDATING


def test_a_job_fails_once_the_validation_stopped_answering(tmp_path):
    scheduler, job = scheduler_and_job(tmp_path, heartbeat_age=120)
    scheduler._validate(job)
    failed = scheduler._store.get_job("acme", "j1").job
    assert failed.state == JobState.FAILED
    assert "is UPLOADING, not READY" in failed.status.message
