"""Job drivers as Ray Jobs: `DriverControl` submits a job attempt's driver
(`python -m raybatch.jobs.driver ...`) through Ray's Job Submission API, asks for its
status and stops it. A driver runs apart from the scheduler, so a restart of the API or
of the scheduler leaves it running.
"""

from __future__ import annotations

import os
import sys
import time
from enum import Enum
from typing import Optional

import ray


class DriverStatus(str, Enum):
    """Ray's JobStatus, plus GONE."""

    PENDING = "PENDING"  # submitted, its process not started yet
    RUNNING = "RUNNING"
    STOPPED = "STOPPED"  # stopped on request (cancel, time limit)
    SUCCEEDED = "SUCCEEDED"  # its process exited 0
    FAILED = "FAILED"  # its process exited non-zero or died
    # Ray knows no such driver: no id was ever recorded, or the cluster it ran on is gone.
    GONE = "GONE"

    @property
    def alive(self) -> bool:
        """Whether the driver may still commit lines."""
        return self in (DriverStatus.PENDING, DriverStatus.RUNNING)


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
        self._submission_client().submit_job(entrypoint=entrypoint, submission_id=driver_id)

    def status(self, driver_id: Optional[str]) -> DriverStatus:
        if not driver_id:
            return DriverStatus.GONE
        try:
            return DriverStatus(str(self._submission_client().get_job_status(driver_id).value))
        # Not found (the cluster it ran on is gone), or a status this version does not
        # know: either way not a driver that is still running.
        except Exception:
            return DriverStatus.GONE

    def stop(self, driver_id: Optional[str], wait_seconds: float = 30.0) -> None:
        """Stop a live driver (Ray Jobs: SIGTERM, then SIGKILL) and wait, up to
        `wait_seconds`, until it has ended, so that it commits nothing after."""
        if self.status(driver_id).alive:
            self._submission_client().stop_job(driver_id)
            deadline = time.monotonic() + wait_seconds
            while self.status(driver_id).alive and time.monotonic() < deadline:
                time.sleep(0.2)
