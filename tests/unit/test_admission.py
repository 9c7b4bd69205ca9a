"""Which PENDING jobs the scheduler starts (JobScheduler._admit), on a real store without
Ray: accounts take turns, the per-account limit holds, the service limit holds."""

from __future__ import annotations

import threading
from datetime import datetime, timedelta, timezone

from raybatch.config import ServiceConfig
from raybatch.jobs.scheduler import JobScheduler
from raybatch.resources import BatchInferenceJob, JobRecord, JobRuntime, JobState
from raybatch.store import Store

START = datetime(2026, 1, 1, tzinfo=timezone.utc)


def scheduler_with(tmp_path, jobs: list[tuple[str, str]], **limits) -> tuple[JobScheduler, list[str]]:
    """A scheduler whose drivers only record that they started (and mark the job
    RUNNING, as the real start does), over PENDING jobs (account, job ID) created in
    this order."""
    config = ServiceConfig(storage=str(tmp_path / "storage"), **limits)
    scheduler = object.__new__(JobScheduler)
    scheduler._config, scheduler._store, scheduler._lock = config, Store(config.storage), threading.RLock()
    for n, (account, job_id) in enumerate(jobs):
        job = BatchInferenceJob(name=f"accounts/{account}/batchInferenceJobs/{job_id}", state=JobState.PENDING,
                                create_time=START + timedelta(seconds=n))
        scheduler._store.put_job(JobRecord(job=job, runtime=JobRuntime(account=account)))
    started: list[str] = []

    def start(record: JobRecord) -> None:
        started.append(record.job.name.rsplit("/", 1)[-1])
        record.job.state = JobState.RUNNING
        scheduler._store.put_job(record)

    scheduler._start_driver = start
    return scheduler, started


def pending(scheduler: JobScheduler) -> list[JobRecord]:
    return sorted(scheduler._store.all_jobs(), key=lambda r: r.job.create_time)


def test_accounts_take_turns_whatever_their_queue(tmp_path):
    jobs = [("big", f"big-{n}") for n in range(5)] + [("small", "small-0")]
    scheduler, started = scheduler_with(tmp_path, jobs, max_running_jobs=3, max_running_jobs_per_account=3)
    scheduler._admit(pending(scheduler))
    assert started == ["big-0", "small-0", "big-1"]  # not big-0, big-1, big-2


def test_the_per_account_limit_leaves_room_for_others(tmp_path):
    jobs = [("big", f"big-{n}") for n in range(5)]
    scheduler, started = scheduler_with(tmp_path, jobs, max_running_jobs=8, max_running_jobs_per_account=2)
    scheduler._admit(pending(scheduler))
    assert started == ["big-0", "big-1"]
    scheduler._store.put_job(JobRecord(  # another account's job arrives later
        job=BatchInferenceJob(name="accounts/late/batchInferenceJobs/late-0", state=JobState.PENDING,
                              create_time=START + timedelta(hours=1)),
        runtime=JobRuntime(account="late")))
    scheduler._admit(pending(scheduler))
    assert started == ["big-0", "big-1", "late-0"]  # big stays at 2


def test_an_account_with_fewer_running_jobs_goes_first(tmp_path):
    jobs = [("busy", "busy-0"), ("busy", "busy-1"), ("idle", "idle-0")]
    scheduler, started = scheduler_with(tmp_path, jobs, max_running_jobs=2, max_running_jobs_per_account=4)
    scheduler._admit(pending(scheduler))
    assert started == ["busy-0", "idle-0"]
    scheduler._config = scheduler._config.model_copy(update={"max_running_jobs": 3})
    scheduler._admit(pending(scheduler))
    assert started == ["busy-0", "idle-0", "busy-1"]
