"""Issue 10, item 6: the scheduler's pass reads the jobs that have not ended through an
index (store.py `active_jobs`), not every record of every account."""

from __future__ import annotations

from raybatch.resources import BatchInferenceJob, JobRecord, JobRuntime, JobState
from raybatch.store import ACTIVE_JOBS, Store


def record(account: str, job_id: str, state: JobState = JobState.PENDING) -> JobRecord:
    return JobRecord(job=BatchInferenceJob(name=f"accounts/{account}/batchInferenceJobs/{job_id}", state=state),
                     runtime=JobRuntime(account=account))


def names(records: list[JobRecord]) -> list[str]:
    return sorted(r.job.name.rsplit("/", 1)[-1] for r in records)


def test_ended_jobs_leave_the_index_and_are_not_read(tmp_path, monkeypatch):
    store = Store(str(tmp_path))
    store.active_jobs()  # a new store: the (empty) index is built once
    for n in range(50):
        store.put_job(record("old", f"ended-{n}", JobState.PENDING), new=True)
        store.put_job(record("old", f"ended-{n}", JobState.COMPLETED))
    store.put_job(record("acme", "live"), new=True)
    store.put_job(record("globex", "running", JobState.PENDING), new=True)
    store.put_job(record("globex", "running", JobState.RUNNING))
    reads = []
    original = store.get_job
    monkeypatch.setattr(store, "get_job", lambda account, job_id: reads.append(job_id) or original(account, job_id))
    assert names(store.active_jobs()) == ["live", "running"]
    assert sorted(reads) == ["live", "running"]  # none of the 50 ended ones


def test_a_store_from_before_the_index_gets_it_built_once(tmp_path):
    store = Store(str(tmp_path))
    store.put_job(record("acme", "waiting"))  # written without the index
    store.put_job(record("acme", "done", JobState.FAILED))
    assert names(store.active_jobs()) == ["waiting"]
    store.put_job(record("acme", "later"), new=True)
    assert names(store.active_jobs()) == ["later", "waiting"]


def test_a_marker_before_its_record_is_kept_and_a_crash_leftover_is_dropped(tmp_path):
    store = Store(str(tmp_path))
    store.active_jobs()  # the index exists
    store.location.write_atomic(f"{ACTIVE_JOBS}/acme.creating", b"")  # create_job between marker and record
    store.put_job(record("acme", "ended", JobState.CANCELLED))
    store.location.write_atomic(f"{ACTIVE_JOBS}/acme.ended", b"")  # a crash before its marker went
    assert store.active_jobs() == []
    assert store.location.list(ACTIVE_JOBS) == ["acme.creating"]
    store.put_job(record("acme", "creating"))
    assert names(store.active_jobs()) == ["creating"]


def test_deleting_a_job_removes_its_marker(tmp_path):
    store = Store(str(tmp_path))
    store.put_job(record("acme", "gone"), new=True)
    store.delete_job("acme", "gone")
    assert store.location.list(ACTIVE_JOBS) == [] and store.active_jobs() == []
