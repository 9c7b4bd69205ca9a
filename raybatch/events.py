"""Structured log lines for operators: one line per job state change and per engine
replica event, as JSON after the logger's prefix, so that a log pipeline (Loki, Cloud
Logging, `jq`) can select a job's or a replica's history by its fields."""

from __future__ import annotations

import json
import logging
from typing import Any


def log_event(logger: logging.Logger, event: str, level: int = logging.INFO, **fields: Any) -> None:
    """`{"event": event, **fields}` on one line; None fields are left out."""
    record = {"event": event, **{k: v for k, v in fields.items() if v is not None}}
    logger.log(level, "%s", json.dumps(record, default=str, ensure_ascii=False))


def log_job_state(logger: logging.Logger, record, source: str, message: str) -> None:
    """A job's record (`JobRecord`) has just moved from `source` to its state."""
    job = record.job
    log_event(
        logger, "job_state", logging.ERROR if job.state.value == "JOB_STATE_FAILED" else logging.INFO,
        job_id=job.name.rsplit("/", 1)[-1], account=record.runtime.account, attempt=record.runtime.attempts,
        source=source, state=job.state.value, message=message or None, driver=record.runtime.driver_id,
    )


def log_replica(logger: logging.Logger, event: str, state, replica, level: int = logging.INFO, **fields: Any) -> None:
    """An engine replica (`ReplicaState` of the model `state`) started, became ready,
    failed or stopped."""
    from raybatch.metrics import precision_label

    spec = state.pool_model.spec
    log_event(
        logger, "engine_replica", level, replica=replica.replica_id, change=event,
        model=", ".join(sorted(state.served_names)) or state.pool_model.served_name,
        source=spec.model, precision=precision_label(spec.engine_args), node=replica.node,
        accelerator=replica.accelerator_type, rows_in_flight=len(replica.in_flight) or None, **fields,
    )
