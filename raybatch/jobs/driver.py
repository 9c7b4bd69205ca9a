"""The pipeline driver of one job attempt, run by the scheduler as a Ray Job:

    python -m raybatch.jobs.driver --storage URL --account A --job ID --attempt N
    python -m raybatch.jobs.driver --storage URL --spare DRIVER_ID [--idle-seconds S]

The second form is a spare: started before any job needs it, it imports the data plane
and joins the cluster, then waits for the scheduler's assignment (`jobs/handoff.py`) and
runs that attempt like the first form would. Then it waits for the next assignment: a
spare is a long-lived driver, so a job given one finds the process, its imports, its
connection to Ray and its tokenizers ready, and no process starts beside the engines
while they are busy. It exits after `--idle-seconds` without an assignment (or when the
scheduler stops it: it keeps only `spare_drivers` idle).

It runs the data plane (`runner.run_job`) with the RunConfig the scheduler wrote, and
leaves a `DriverOutcome` for the scheduler (`jobs/handoff.py`): completed,
output_cap_reached, or failed with a message (settings that cannot work). A crash
leaves no outcome; the scheduler then re-queues the job, which resumes from its
committed parts. Publishing the result files is the scheduler's step
(WRITING_RESULTS), not the driver's.
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import signal
import sys
import time
from typing import Optional

from raybatch.events import log_event
from raybatch.exceptions import ConfigError, OutputConflictError
from raybatch.jobs.handoff import (
    DriverAssignment,
    DriverOutcome,
    OutcomeState,
    read_assignment,
    read_run_config,
    write_outcome,
)
from raybatch.store import Store

ASSIGNMENT_POLL_SECONDS = 0.2  # half of it on average before a spare starts its job
# How long a spare waits for the job's record to name it once its assignment is there
# (the scheduler writes the record right after the assignment).
RECORD_WAIT_SECONDS = 15.0


def wait_for_assignment(store: Store, driver_id: str, idle_seconds: float,
                        done: Optional[DriverAssignment] = None) -> Optional[DriverAssignment]:
    """The attempt this spare is to run next, or None: no new assignment came within
    `idle_seconds`, the cluster that started it is gone, or its job's record never
    named this driver (the scheduler stopped between writing the two, or took the job
    back; the spare then exits, and a record that names it late finds it gone and
    re-queues the job). `done`: the attempt it ran last, whose assignment the scheduler
    may not have removed yet."""
    deadline = time.monotonic() + idle_seconds
    # Ray Jobs runs this process under its job supervisor. A stopped cluster kills the
    # supervisor but not this process, which only reads storage while it waits and so
    # would never notice: a new parent (init) means the cluster that started it is gone.
    parent = os.getppid()
    while (assignment := read_assignment(store.location, driver_id)) in (None, done):
        if time.monotonic() > deadline or os.getppid() != parent:
            return None
        time.sleep(ASSIGNMENT_POLL_SECONDS)
    return assignment if _named_in_record(store, driver_id, assignment) else None


def _named_in_record(store: Store, driver_id: str, assignment: DriverAssignment) -> bool:
    """Whether the job's record names this driver for the assigned attempt, within
    RECORD_WAIT_SECONDS (the scheduler writes the record right after the assignment)."""
    deadline = time.monotonic() + RECORD_WAIT_SECONDS
    while time.monotonic() < deadline:
        record = store.get_job(assignment.account, assignment.job_id)
        if record and record.runtime.driver_id == driver_id and record.runtime.attempts == assignment.attempt:
            return True
        time.sleep(ASSIGNMENT_POLL_SECONDS)
    return False


def run_attempt(store: Store, account: str, job_id: str, attempt: int) -> int:
    """Run one attempt and leave its outcome; the exit code it stands for."""
    from raybatch.runner import run_job

    config = read_run_config(store.location, account, job_id)
    try:
        summary = run_job(config, publish=False)
    except (ConfigError, OutputConflictError) as error:
        outcome, code = DriverOutcome(state=OutcomeState.FAILED, message=str(error)), 2
    else:
        outcome, code = DriverOutcome(state=OutcomeState(summary.state)), 0
    write_outcome(store.location, account, job_id, attempt, outcome)
    return code


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="raybatch.jobs.driver")
    parser.add_argument("--storage", required=True)
    parser.add_argument("--account")
    parser.add_argument("--job")
    parser.add_argument("--attempt", type=int)
    parser.add_argument("--spare", metavar="DRIVER_ID", help="wait for the scheduler's assignment")
    parser.add_argument("--idle-seconds", type=float, default=900.0)
    args = parser.parse_args(argv)
    if not args.spare and None in (args.account, args.job, args.attempt):
        parser.error("--account, --job and --attempt are required without --spare")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # Ray Jobs stops a driver with SIGTERM: exit at once; committed parts are safe and
    # anything uncommitted is simply not done yet.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    store = Store(args.storage)
    if not args.spare:
        return run_attempt(store, args.account, args.job, args.attempt)
    from raybatch.runner import ensure_ray

    ensure_ray()  # joining the cluster is part of what a spare does ahead of its job
    done = None
    while (assignment := wait_for_assignment(store, args.spare, args.idle_seconds, done)) is not None:
        log_event("spare_assigned", driver=args.spare, job_id=assignment.job_id,
                  account=assignment.account, attempt=assignment.attempt)
        run_attempt(store, assignment.account, assignment.job_id, assignment.attempt)
        done = assignment
        gc.collect()  # the last job's rows and tables, before the process waits idle
    return 0


if __name__ == "__main__":
    sys.exit(main())
