"""The pipeline driver of one job attempt, run by the scheduler as a Ray Job:

    python -m raybatch.jobs.driver --storage URL --account A --job ID --attempt N

It runs the data plane (`runner.run_job`) with the RunConfig the scheduler wrote, and
leaves a `DriverOutcome` for the scheduler (`jobs/handoff.py`): completed,
output_cap_reached, or failed with a message (settings that cannot work). A crash
leaves no outcome; the scheduler then re-queues the job, which resumes from its
committed parts. Publishing the result files is the scheduler's step
(WRITING_RESULTS), not the driver's.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys

from raybatch.exceptions import ConfigError, OutputConflictError
from raybatch.jobs.handoff import DriverOutcome, OutcomeState, read_run_config, write_outcome
from raybatch.store import Store


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="raybatch.jobs.driver")
    parser.add_argument("--storage", required=True)
    parser.add_argument("--account", required=True)
    parser.add_argument("--job", required=True)
    parser.add_argument("--attempt", type=int, required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # Ray Jobs stops a driver with SIGTERM: exit at once; committed parts are safe and
    # anything uncommitted is simply not done yet.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    from raybatch.runner import run_job

    store = Store(args.storage)
    config = read_run_config(store.location, args.account, args.job)

    try:
        summary = run_job(config, publish=False)
    except (ConfigError, OutputConflictError) as error:
        outcome, code = DriverOutcome(state=OutcomeState.FAILED, message=str(error)), 2
    else:
        outcome, code = DriverOutcome(state=OutcomeState(summary.state)), 0
    write_outcome(store.location, args.account, args.job, args.attempt, outcome)
    return code


if __name__ == "__main__":
    sys.exit(main())
