"""Structured log lines for operators: one line per job state change and per engine
replica event, as JSON after the logger's prefix, so that a log pipeline (Loki, Cloud
Logging, `jq`) can select a job's or a replica's history by its fields.

They go to the `raybatch.events` logger, which writes to stderr itself: in a Ray actor
(the scheduler, the engine pool) nothing configures Python's logging, and INFO lines
would be dropped. Ray keeps each actor's stderr (the dashboard's logs, `ray logs`)."""

from __future__ import annotations

import json
import logging
from typing import Any


EVENTS = logging.getLogger("raybatch.events")
if not EVENTS.handlers:
    _handler = logging.StreamHandler()
    _handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    EVENTS.addHandler(_handler)
    EVENTS.setLevel(logging.INFO)
    EVENTS.propagate = False  # a process that configured logging would print it twice


def log_event(event: str, level: int = logging.INFO, **fields: Any) -> None:
    """`{"event": event, **fields}` on one line; None fields are left out."""
    record = {"event": event, **{k: v for k, v in fields.items() if v is not None}}
    EVENTS.log(level, "%s", json.dumps(record, default=str, ensure_ascii=False))


def log_job_state(record, source: str, message: str) -> None:
    """A job's record (`JobRecord`) has just moved from `source` to its state."""
    job = record.job
    log_event(
        "job_state", logging.ERROR if job.state.value == "JOB_STATE_FAILED" else logging.INFO,
        job_id=job.name.rsplit("/", 1)[-1], account=record.runtime.account, attempt=record.runtime.attempts,
        source=source, state=job.state.value, message=message or None, driver=record.runtime.driver_id,
    )


def log_replica(event: str, state, replica, level: int = logging.INFO, **fields: Any) -> None:
    """An engine replica (`ReplicaState` of the model `state`) started, became ready,
    failed or stopped."""
    from raybatch.metrics import precision_label

    spec = state.pool_model.spec
    log_event(
        "engine_replica", level, replica=replica.replica_id, change=event,
        model=", ".join(sorted(state.served_names)) or state.pool_model.served_name,
        source=spec.model, precision=precision_label(spec.engine_args), node=replica.node,
        accelerator=replica.accelerator_type, rows_in_flight=len(replica.in_flight) or None, **fields,
    )
