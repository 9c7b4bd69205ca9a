"""What the scheduler and a job attempt's driver (`jobs/driver.py`) leave each other in
storage, beside the job's record. The scheduler writes the attempt's RunConfig before it
submits the driver; the driver writes a `DriverOutcome` when it ends by itself. A driver
that crashes or is killed leaves no outcome, and the scheduler re-queues the job, which
resumes from its committed parts.
"""

from __future__ import annotations

from enum import Enum
from typing import Optional

from pydantic import BaseModel

from raybatch.config import RunConfig
from raybatch.resources import JOBS, resource_name
from raybatch.storage import Location


class OutcomeState(str, Enum):
    # Every line is answered: the scheduler publishes the files and the job COMPLETES.
    COMPLETED = "completed"
    # The output size cap stopped it: the job EXPIRES with its committed part published.
    OUTPUT_CAP_REACHED = "output_cap_reached"
    # Settings that cannot work (a ConfigError, an output of another job): the job
    # FAILS at once; another attempt would fail the same way.
    FAILED = "failed"


class DriverOutcome(BaseModel):
    """How one attempt's driver ended, as the driver saw it."""

    state: OutcomeState
    message: str = ""


def run_config_path(account: str, job_id: str) -> str:
    return f"{resource_name(account, JOBS, job_id)}/run-config.json"


def outcome_path(account: str, job_id: str, attempt: int) -> str:
    # One file per attempt: an outcome left by an earlier attempt never answers for a later one.
    return f"{resource_name(account, JOBS, job_id)}/outcome-{attempt}.json"


def write_run_config(store: Location, account: str, job_id: str, config: RunConfig) -> None:
    store.write_atomic(run_config_path(account, job_id), config.model_dump_json().encode())


def read_run_config(store: Location, account: str, job_id: str) -> RunConfig:
    return RunConfig.model_validate_json(store.read_bytes(run_config_path(account, job_id)))


def write_outcome(store: Location, account: str, job_id: str, attempt: int, outcome: DriverOutcome) -> None:
    store.write_atomic(outcome_path(account, job_id, attempt), outcome.model_dump_json().encode())


def read_outcome(store: Location, account: str, job_id: str, attempt: int) -> Optional[DriverOutcome]:
    """The attempt's outcome, or None when its driver left none (it crashed, was stopped
    or is still running)."""
    path = outcome_path(account, job_id, attempt)
    if not store.exists(path):
        return None
    return DriverOutcome.model_validate_json(store.read_bytes(path))


# --------------------------------------------------------------- spare drivers
# A spare driver is a driver process started before any job needs it (its process start
# and imports, seconds on a small machine, are then behind it). The scheduler gives it a
# job by writing an assignment, and only then names it in the job's record; the spare
# runs the job only once the record names it, so a scheduler that stops between the two
# leaves an idle spare (which exits), never a job run by a driver the record does not name.


class DriverAssignment(BaseModel):
    """The job attempt given to a spare driver."""

    account: str
    job_id: str
    attempt: int


SPARE_DRIVER_PREFIX = "raybatch-spare-"


def assignment_path(driver_id: str) -> str:
    return f"service/drivers/{driver_id}.json"


def write_assignment(store: Location, driver_id: str, assignment: DriverAssignment) -> None:
    store.write_atomic(assignment_path(driver_id), assignment.model_dump_json().encode())


def read_assignment(store: Location, driver_id: str) -> Optional[DriverAssignment]:
    path = assignment_path(driver_id)
    if not store.exists(path):
        return None
    return DriverAssignment.model_validate_json(store.read_bytes(path))


def delete_assignment(store: Location, driver_id: Optional[str]) -> None:
    if driver_id and driver_id.startswith(SPARE_DRIVER_PREFIX):
        store.delete(assignment_path(driver_id))
