"""The scheduler↔driver handoff and the driver statuses, without Ray running."""

import json

from ray.job_submission import JobStatus

from raybatch.jobs.driver_control import DriverStatus
from raybatch.jobs.handoff import DriverOutcome, OutcomeState, outcome_path, read_outcome, write_outcome
from raybatch.storage import Location


def test_outcome_file_keeps_its_format(tmp_path):
    """A scheduler reads outcomes left by drivers of the version before, and the other way."""
    store = Location(str(tmp_path))
    write_outcome(store, "acct", "job-1", 2, DriverOutcome(state=OutcomeState.OUTPUT_CAP_REACHED))
    written = json.loads((tmp_path / outcome_path("acct", "job-1", 2)).read_text())
    assert written == {"state": "output_cap_reached", "message": ""}

    (tmp_path / outcome_path("acct", "job-1", 3)).write_text(json.dumps({"state": "failed", "message": "bad model"}))
    assert read_outcome(store, "acct", "job-1", 3) == DriverOutcome(state=OutcomeState.FAILED, message="bad model")


def test_no_outcome_reads_as_none(tmp_path):
    assert read_outcome(Location(str(tmp_path)), "acct", "job-1", 1) is None


def test_every_ray_job_status_has_a_driver_status():
    for status in JobStatus:
        assert DriverStatus(status.value).alive == (status in (JobStatus.PENDING, JobStatus.RUNNING))
    assert not DriverStatus.GONE.alive


def test_only_a_404_from_the_dashboard_means_the_driver_is_gone():
    """A dashboard that times out or answers 500 under load must not read as a dead
    driver: the scheduler would start a second attempt beside the running one. The
    errors are the ones Ray's JobSubmissionClient raises (dashboard_sdk._raise_error)."""
    import requests

    from raybatch.jobs.driver_control import DriverControl

    class Dashboard:
        def get_job_status(self, driver_id):
            raise {
                "gone": RuntimeError("Request failed with status code 404: Job gone does not exist."),
                "busy": RuntimeError("Request failed with status code 500: Internal Server Error."),
                "down": requests.exceptions.ConnectionError("Connection refused"),
                "slow": requests.exceptions.ReadTimeout("read timed out"),
            }[driver_id]

    control = DriverControl()
    control._client = Dashboard()
    assert control.status("gone") == DriverStatus.GONE
    for driver in ("busy", "down", "slow"):
        assert control.status(driver) == DriverStatus.UNKNOWN, driver
    assert DriverStatus.UNKNOWN.alive
    assert control.status(None) == DriverStatus.GONE
