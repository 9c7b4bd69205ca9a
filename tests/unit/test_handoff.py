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
    driver: the scheduler would start a second attempt beside the running one."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    import ray
    from ray.job_submission import JobSubmissionClient

    from raybatch.jobs.driver_control import DriverControl

    class Dashboard(BaseHTTPRequestHandler):
        def do_GET(self):
            code, body = {
                "/api/version": (200, {"ray_version": ray.__version__, "version": "4"}),
                "/api/jobs/gone": (404, {}),
                "/api/jobs/busy": (500, {}),
            }[self.path]
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Dashboard)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        control = DriverControl()
        control._client = JobSubmissionClient(f"http://127.0.0.1:{server.server_port}")
        assert control.status("gone") == DriverStatus.GONE
        assert control.status("busy") == DriverStatus.UNKNOWN and DriverStatus.UNKNOWN.alive
        server.shutdown()
        server.server_close()
        assert control.status("gone") == DriverStatus.UNKNOWN  # the dashboard is down, not the driver
    finally:
        server.server_close()
    assert control.status(None) == DriverStatus.GONE
