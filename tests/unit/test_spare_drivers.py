"""Spare drivers (jobs/spares.py): the scheduler's side and the spare's side of the
handoff, without Ray running. A spare runs a job only once the job's record names it."""

from __future__ import annotations

import threading
import time
from datetime import datetime, timedelta, timezone

import pytest

from raybatch.jobs import driver
from raybatch.jobs.driver_control import DriverStatus
from raybatch.jobs.handoff import SPARE_DRIVER_PREFIX, DriverAssignment, assignment_path, read_assignment
from raybatch.jobs.scheduler import FIRST_ROWS_SECONDS, first_rows_pending
from raybatch.jobs.spares import SpareDrivers
from raybatch.protocol import JobProgress
from raybatch.resources import BatchInferenceJob, JobRecord, JobRuntime, JobState
from raybatch.store import Store


class FakeRayJobs:
    """DriverControl's calls, answered from a dict of driver id → status."""

    def __init__(self, live=()):
        self.statuses = {d: DriverStatus.RUNNING for d in live}
        self.stopped: list[str] = []

    def live_drivers(self, prefix):
        return [d for d, s in self.statuses.items() if d.startswith(prefix) and s.alive]

    def status(self, driver_id):
        return self.statuses.get(driver_id, DriverStatus.GONE)

    def stop(self, driver_id, wait_seconds=30.0):
        self.stopped.append(driver_id)
        self.statuses[driver_id] = DriverStatus.STOPPED

    def submit_spare(self, driver_id, *, storage, idle_seconds):
        self.statuses[driver_id] = DriverStatus.PENDING


def named(store: Store, driver_id: str, attempt: int = 1) -> None:
    """The scheduler's second step: the job's record names the driver."""
    store.put_job(JobRecord(
        job=BatchInferenceJob(name="accounts/acme/batchInferenceJobs/j1", state=JobState.RUNNING),
        runtime=JobRuntime(account="acme", driver_id=driver_id, attempts=attempt),
    ))


def two_started(tmp_path) -> tuple[Store, FakeRayJobs, SpareDrivers]:
    """A store, Ray's jobs, and a SpareDrivers of count 2 that has started its two."""
    store = Store(str(tmp_path))
    ray_jobs = FakeRayJobs()
    spares = SpareDrivers(ray_jobs, store.location, str(tmp_path), count=2, idle_seconds=60)
    spares.keep()
    return store, ray_jobs, spares


def test_spares_are_kept_started_and_replaced_when_gone(tmp_path):
    _, ray_jobs, spares = two_started(tmp_path)
    first = list(ray_jobs.statuses)
    assert len(first) == 2 and all(d.startswith(SPARE_DRIVER_PREFIX) for d in first)
    spares.keep()
    assert list(ray_jobs.statuses) == first  # none more while both live
    ray_jobs.statuses[first[0]] = DriverStatus.SUCCEEDED  # it waited its idle time out
    spares.keep()
    assert len([s for s in ray_jobs.statuses.values() if s.alive]) == 2


AT = datetime(2026, 1, 1, 12, 0, tzinfo=timezone.utc)  # a fixed "now": no test depends on when it runs


def running(started_ago: float, processed: int = 0, state: JobState = JobState.RUNNING) -> JobRecord:
    """A job that started `started_ago` seconds before AT."""
    return JobRecord(
        job=BatchInferenceJob(name="accounts/acme/batchInferenceJobs/j1", state=state,
                              job_progress=JobProgress(total_processed_requests=processed)),
        runtime=JobRuntime(account="acme", running_since=AT - timedelta(seconds=started_ago)),
    )


@pytest.mark.parametrize("records, pending", [
    ([], False),
    ([running(2)], True),  # just started, nothing committed: its first rows come first
    ([running(2, processed=16)], False),  # its first rows are in
    ([running(FIRST_ROWS_SECONDS + 1)], False),  # a cold engine or a stuck job holds nothing
    ([running(2, state=JobState.PENDING)], False),
    ([running(2, processed=16), running(3)], True),
])
def test_a_new_job_without_rows_is_polled_often(records, pending):
    assert first_rows_pending(records, AT) is pending


def test_take_writes_the_assignment_and_hands_each_spare_out_once(tmp_path):
    store = Store(str(tmp_path))
    spares = SpareDrivers(FakeRayJobs(), store.location, str(tmp_path), count=1, idle_seconds=60)
    assignment = DriverAssignment(account="acme", job_id="j1", attempt=1)
    assert spares.take(assignment) is None  # none started yet: the job gets its own driver
    spares.keep()
    driver_id = spares.take(assignment)
    assert read_assignment(store.location, driver_id) == assignment
    assert spares.take(assignment) is None


def test_a_spare_that_died_idle_is_not_given_a_job(tmp_path):
    store, ray_jobs, spares = two_started(tmp_path)
    dead, alive = list(ray_jobs.statuses)
    ray_jobs.statuses[dead] = DriverStatus.FAILED  # killed, or its node lost
    assignment = DriverAssignment(account="acme", job_id="j1", attempt=1)
    assert spares.take(assignment) == alive
    assert read_assignment(store.location, dead) is None


def test_a_spare_whose_job_ended_is_first_in_line_and_surplus_ones_stop(tmp_path):
    _, ray_jobs, spares = two_started(tmp_path)
    first, second = list(ray_jobs.statuses)
    busy = spares.take(DriverAssignment(account="acme", job_id="j1", attempt=1))
    assert busy == first
    spares.keep()  # a new one replaces it meanwhile
    third = [d for d in ray_jobs.statuses if d not in (first, second)][0]
    spares.give_back(busy)  # its job's outcome is in: it waits for the next
    assert ray_jobs.stopped == [third]  # two ready without it: the newest start goes
    assert spares.take(DriverAssignment(account="globex", job_id="j2", attempt=1)) == busy
    assert spares.take(DriverAssignment(account="globex", job_id="j3", attempt=1)) == second
    spares.give_back("raybatch-acme-j4-1-abc")  # a driver of its own exits by itself
    spares.give_back(busy)
    spares.give_back(busy)  # twice: still one entry
    assert spares.take(DriverAssignment(account="acme", job_id="j5", attempt=1)) == busy
    assert spares.take(DriverAssignment(account="acme", job_id="j6", attempt=1)) is None


def test_a_new_scheduler_stops_the_idle_spares_of_the_last_but_not_their_jobs(tmp_path):
    store = Store(str(tmp_path))
    idle, busy = f"{SPARE_DRIVER_PREFIX}idle", f"{SPARE_DRIVER_PREFIX}busy"
    ray_jobs = FakeRayJobs(live=[idle, busy, "raybatch-acme-j2-1-abc"])
    store.location.write_atomic(assignment_path(busy), DriverAssignment(account="acme", job_id="j1", attempt=1).model_dump_json().encode())
    SpareDrivers(ray_jobs, store.location, str(tmp_path), count=0, idle_seconds=60).keep()
    assert ray_jobs.stopped == [idle]


def test_a_new_scheduler_takes_back_the_spares_whose_jobs_it_sees_end(tmp_path):
    """Jobs ran on spares of the scheduler before; this one reads their outcomes before
    its first look at the spares: they are its ready spares, not idle ones to stop."""
    store = Store(str(tmp_path))
    finished, idle = f"{SPARE_DRIVER_PREFIX}finished", f"{SPARE_DRIVER_PREFIX}idle"
    ray_jobs = FakeRayJobs(live=[finished, idle])
    spares = SpareDrivers(ray_jobs, store.location, str(tmp_path), count=1, idle_seconds=60)
    spares.give_back(finished)  # its job's outcome is in (the assignment removed)
    spares.keep()
    assert ray_jobs.stopped == [idle]
    assert spares.take(DriverAssignment(account="acme", job_id="j2", attempt=1)) == finished


def test_a_spare_runs_the_job_its_record_names(tmp_path):
    store = Store(str(tmp_path))
    assignment = DriverAssignment(account="acme", job_id="j1", attempt=1)

    def scheduler():
        time.sleep(0.3)
        store.location.write_atomic(assignment_path("spare-1"), assignment.model_dump_json().encode())
        time.sleep(0.3)
        named(store, "spare-1")

    threading.Thread(target=scheduler).start()
    assert driver.wait_for_assignment(store, "spare-1", idle_seconds=10) == assignment


def test_a_spare_runs_one_job_after_another_and_never_the_same_twice(tmp_path):
    """After its job, the spare waits on; the assignment it has just run, still there
    until the scheduler removes it, is not run again."""
    store = Store(str(tmp_path))
    first = DriverAssignment(account="acme", job_id="j1", attempt=1)
    store.location.write_atomic(assignment_path("spare-1"), first.model_dump_json().encode())
    named(store, "spare-1")
    assert driver.wait_for_assignment(store, "spare-1", idle_seconds=10) == first
    started = time.monotonic()
    assert driver.wait_for_assignment(store, "spare-1", idle_seconds=0.5, done=first) is None
    assert time.monotonic() - started >= 0.5
    again = DriverAssignment(account="acme", job_id="j1", attempt=2)  # the job's next attempt

    def scheduler():
        time.sleep(0.3)
        store.location.write_atomic(assignment_path("spare-1"), again.model_dump_json().encode())
        named(store, "spare-1", attempt=2)

    threading.Thread(target=scheduler).start()
    assert driver.wait_for_assignment(store, "spare-1", idle_seconds=10, done=first) == again


def test_a_spare_runs_its_jobs_in_one_process(tmp_path, monkeypatch):
    """`jobs/driver.py --spare`: each assignment run in turn in the same process; no
    assignment within the idle time ends it."""
    ran: list[tuple] = []
    assignments = iter([DriverAssignment(account="acme", job_id="j1", attempt=1),
                        DriverAssignment(account="globex", job_id="j2", attempt=1), None])
    monkeypatch.setattr(driver, "wait_for_assignment", lambda *args: next(assignments))
    monkeypatch.setattr(driver, "run_attempt", lambda store, *job: ran.append(job) or 0)
    monkeypatch.setattr("raybatch.runner.ensure_ray", lambda: None)
    monkeypatch.setattr(driver.signal, "signal", lambda *args: None)
    assert driver.main(["--storage", str(tmp_path), "--spare", "spare-1"]) == 0
    assert ran == [("acme", "j1", 1), ("globex", "j2", 1)]


def test_a_spare_whose_record_names_another_driver_runs_nothing(tmp_path, monkeypatch):
    """The scheduler stopped between assignment and record, and a new one gave the job
    (same attempt number) to another driver: this spare must not run it too."""
    monkeypatch.setattr(driver, "RECORD_WAIT_SECONDS", 0.5)
    store = Store(str(tmp_path))
    store.location.write_atomic(
        assignment_path("spare-1"), DriverAssignment(account="acme", job_id="j1", attempt=1).model_dump_json().encode()
    )
    named(store, "raybatch-acme-j1-1-abc")
    assert driver.wait_for_assignment(store, "spare-1", idle_seconds=10) is None


def test_a_spare_without_a_job_gives_up_after_its_idle_time(tmp_path):
    started = time.monotonic()
    assert driver.wait_for_assignment(Store(str(tmp_path)), "spare-1", idle_seconds=0.3) is None
    assert 0.3 <= time.monotonic() - started < 2


def test_a_spare_whose_cluster_is_gone_exits(tmp_path, monkeypatch):
    """A stopped cluster kills the Ray Jobs supervisor, not the spare (seen: an orphan
    polling storage for minutes under init); its parent changing ends the wait."""
    parents = iter([1234, 1234, 1])
    monkeypatch.setattr(driver.os, "getppid", lambda: next(parents, 1))
    started = time.monotonic()
    assert driver.wait_for_assignment(Store(str(tmp_path)), "spare-1", idle_seconds=60) is None
    assert time.monotonic() - started < 5
