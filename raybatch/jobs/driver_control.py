"""Job drivers as Ray Jobs: `DriverControl` submits a job attempt's driver
(`python -m raybatch.jobs.driver ...`) through Ray's Job Submission API, asks for its
status and stops it. A driver runs apart from the scheduler, so a restart of the API or
of the scheduler leaves it running.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from enum import Enum
from typing import Optional

import ray

log = logging.getLogger(__name__)


class DriverStatus(str, Enum):
    """Ray's JobStatus, plus GONE."""

    PENDING = "PENDING"  # submitted, its process not started yet
    RUNNING = "RUNNING"
    STOPPED = "STOPPED"  # stopped on request (cancel, time limit)
    SUCCEEDED = "SUCCEEDED"  # its process exited 0
    FAILED = "FAILED"  # its process exited non-zero or died
    # Ray knows no such driver: no id was ever recorded, or the cluster it ran on is gone.
    GONE = "GONE"
    # The dashboard did not answer (a timeout, a 5xx, a refused connection on a loaded
    # head): the driver may well be running, so it counts as alive until the next look.
    UNKNOWN = "UNKNOWN"

    @property
    def alive(self) -> bool:
        """Whether the driver may still commit lines."""
        return self in (DriverStatus.PENDING, DriverStatus.RUNNING, DriverStatus.UNKNOWN)


class DriverControl:
    """Owns the scheduler's JobSubmissionClient, made on first use: the dashboard it
    talks to may not be up yet when the scheduler starts."""

    def __init__(self):
        self._client = None

    def _submission_client(self):
        if self._client is None:
            from ray.job_submission import JobSubmissionClient

            address = os.environ.get("RAY_API_SERVER_ADDRESS") or ray._private.worker.get_dashboard_url()
            self._client = JobSubmissionClient(address if "://" in address else f"http://{address}")
        return self._client

    def submit(self, driver_id: str, *, storage: str, account: str, job_id: str, attempt: int) -> None:
        """Start the driver of one attempt; `driver_id` is the Ray Job's submission id."""
        entrypoint = (
            f"{sys.executable} -m raybatch.jobs.driver --storage {storage} "
            f"--account {account} --job {job_id} --attempt {attempt}"
        )
        # The Ray dashboard's Jobs page shows the submission id (account, job and attempt
        # are in it) and this metadata: which batch job a Ray job is.
        metadata = {"raybatch_job_id": job_id, "raybatch_account": account, "raybatch_attempt": str(attempt)}
        self._submission_client().submit_job(entrypoint=entrypoint, submission_id=driver_id, metadata=metadata)

    def submit_spare(self, driver_id: str, *, storage: str, idle_seconds: float) -> None:
        """Start a spare driver (`jobs/driver.py --spare`), which waits for an assignment."""
        entrypoint = (
            f"{sys.executable} -m raybatch.jobs.driver --storage {storage} "
            f"--spare {driver_id} --idle-seconds {idle_seconds:g}"
        )
        # A Ray job's metadata is fixed at submission, before a spare has a job: the job's
        # record names the spare (`driver`, in the scheduler's job_state log line), and
        # the spare's own log says which job it runs.
        metadata = {"raybatch_spare": "true"}
        self._submission_client().submit_job(entrypoint=entrypoint, submission_id=driver_id, metadata=metadata)

    def live_drivers(self, prefix: str) -> list[str]:
        """The live drivers whose id starts with `prefix` (empty when Ray cannot say)."""
        try:
            jobs = self._submission_client().list_jobs()
        except Exception as error:
            log.warning("cannot list drivers (%s)", error)
            return []
        return [
            job.submission_id for job in jobs
            if (job.submission_id or "").startswith(prefix) and DriverStatus(str(job.status.value)).alive
        ]

    def status(self, driver_id: Optional[str]) -> DriverStatus:
        """GONE only when Ray says it knows no such driver (HTTP 404). Any other failure
        to ask is UNKNOWN: taking it for GONE would start a second attempt beside a
        driver that still runs (the soak saw this on a loaded two-core head)."""
        if not driver_id:
            return DriverStatus.GONE
        try:
            return DriverStatus(str(self._submission_client().get_job_status(driver_id).value))
        # RuntimeError is the SDK's error for any non-200 answer; connection errors, or
        # a status this Ray version has and this module does not (ValueError), are
        # unknown too.
        except Exception as error:
            if isinstance(error, RuntimeError) and "status code 404" in str(error):
                return DriverStatus.GONE
            log.warning("driver %s: status unknown (%s); asking again on the next tick", driver_id, error)
            return DriverStatus.UNKNOWN

    def stop(self, driver_id: Optional[str], wait_seconds: float = 30.0) -> None:
        """Stop a live driver (Ray Jobs: SIGTERM, then SIGKILL) and wait, up to
        `wait_seconds`, until it has ended, so that it commits nothing after."""
        if self.status(driver_id).alive:
            self._submission_client().stop_job(driver_id)
            deadline = time.monotonic() + wait_seconds
            while self.status(driver_id).alive and time.monotonic() < deadline:
                time.sleep(0.2)
