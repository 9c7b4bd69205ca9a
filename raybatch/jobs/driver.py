"""The pipeline driver of one job attempt, run by the scheduler as a Ray Job:

    python -m raybatch.jobs.driver --storage URL --account A --job ID --attempt N

It runs the data plane (`runner.run_job`) with the RunConfig the scheduler wrote, and
leaves an outcome record for the scheduler: completed, output_cap_reached, or failed
with a message (settings that cannot work). A crash leaves no outcome; the scheduler
then re-queues the job, which resumes from its committed parts. Publishing the result
files is the scheduler's step (WRITING_RESULTS), not the driver's.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys

from raybatch.config import RunConfig
from raybatch.exceptions import ConfigError, OutputConflictError
from raybatch.jobs.scheduler import outcome_path, run_config_path
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
    config = RunConfig.model_validate_json(store.location.read_bytes(run_config_path(args.account, args.job)))

    def record(state: str, message: str = "") -> None:
        outcome = json.dumps({"state": state, "message": message}).encode()
        store.location.write_atomic(outcome_path(args.account, args.job, args.attempt), outcome)

    try:
        summary = run_job(config, publish=False)
    except (ConfigError, OutputConflictError) as error:
        record("failed", str(error))
        return 2
    record(summary.state)
    return 0


if __name__ == "__main__":
    sys.exit(main())
