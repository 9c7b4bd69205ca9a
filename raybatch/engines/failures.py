"""Engine failures and the rows that were in flight: so that one row that kills or hangs
the engine every time it is asked cannot restart engines forever.

When a replica dies or hangs, the engine pool writes what each job had in flight on it
to that job's output location (`_raybatch/engine-failures/<id>.json`); the pool reads a
job's records when the job first sends rows, so what was learnt survives a pool or
driver restart. A row that was in flight at a failure is a suspect: the pool sends it to
a replica alone, with nothing else in flight there, so that a failure while it runs is
its own. A row that was alone on a replica at `max_failures_per_row` failures is a
poison row: it becomes an `engine_error` row and is never sent again. Rows that only
shared a failing replica — of this job or any other — are never blamed.

A job is also bounded as a whole: the failures where its rows were all the replica had
in flight (nobody else's rows, so nobody else can be to blame) are its own, and at
`max_engine_failures_per_job` of them every row of the job not yet answered becomes an
`engine_error` row: a job of many poison rows cannot restart engines row after row.
"""

from __future__ import annotations

import time
import uuid
from typing import Optional

from pydantic import BaseModel

from raybatch.output_layout import ENGINE_FAILURES_DIR
from raybatch.storage import Location

RowKey = tuple[str, int]  # (shard, line)


class EngineFailureRecord(BaseModel):
    reason: str
    in_flight: list[RowKey]  # this job's rows on the replica
    # Whether the replica had nothing else in flight, of any job. None: a record written
    # before replicas were shared, when a job's rows were all a replica had.
    alone: Optional[bool] = None
    # Whether every row in flight on the replica was this job's. None: a record written
    # before this was recorded; then it counts only where the row was alone.
    exclusive: Optional[bool] = None

    @property
    def was_alone(self) -> bool:
        return self.alone if self.alone is not None else len(self.in_flight) == 1

    @property
    def was_exclusive(self) -> bool:
        return self.exclusive if self.exclusive is not None else self.was_alone


class FailureLog:
    """The failures recorded so far for one job's output: read once, then kept up to
    date in memory by `record`."""

    def __init__(self, output_url: str):
        self._out = Location(output_url)
        records = [
            EngineFailureRecord.model_validate_json(self._out.read_bytes(f"{ENGINE_FAILURES_DIR}/{name}"))
            for name in self._out.list(ENGINE_FAILURES_DIR)
            if name.endswith(".json")
        ]
        self._suspects: set[RowKey] = set()
        self._alone: dict[RowKey, list[str]] = {}  # a row → reasons of failures it had alone
        self.caused = 0  # failures with only this job's rows in flight: the job's own
        for record in records:
            self._remember(record)

    def _remember(self, record: EngineFailureRecord) -> None:
        self._suspects.update(tuple(key) for key in record.in_flight)
        self.caused += record.was_exclusive
        if record.was_alone:
            for key in record.in_flight:
                self._alone.setdefault(tuple(key), []).append(record.reason)

    def is_suspect(self, key: RowKey) -> bool:
        return key in self._suspects

    def failures_alone(self, key: RowKey) -> list[str]:
        return self._alone.get(key, [])

    def remember(self, reason: str, in_flight: list[RowKey], alone: bool, exclusive: Optional[bool] = None) -> EngineFailureRecord:
        """Count a failure now; `write` it down after (storage I/O, off the pool's loop).
        `exclusive`: only this job's rows were in flight (None: only if `alone`)."""
        record = EngineFailureRecord(
            reason=reason, in_flight=sorted(in_flight), alone=alone, exclusive=alone if exclusive is None else exclusive
        )
        self._remember(record)
        return record

    def write(self, record: EngineFailureRecord) -> None:
        """Best effort (the caller logs its error): without a record a restarted pool
        retries the rows as if nothing were known."""
        # Named by time first, so that the sorted listing reads records in the order they
        # were written and a poison row's message names its latest failure.
        name = f"{time.time_ns():020d}-{uuid.uuid4().hex}.json"
        self._out.write_atomic(f"{ENGINE_FAILURES_DIR}/{name}", record.model_dump_json().encode())


def budget_message(log: FailureLog, limit: int) -> Optional[str]:
    """The engine_error message for every row of a job whose rows have caused `limit`
    engine failures (`max_engine_failures_per_job`), else None."""
    if log.caused < limit:
        return None
    return (
        f"this job's requests were all the engine had in flight at {log.caused} engine failures, "
        f"its limit (max_engine_failures_per_job {limit}); its requests not yet answered are not sent"
    )


def poison_message(failures: list[str], limit: int) -> Optional[str]:
    """The engine_error message for a row that failed the engine alone `limit` times."""
    if len(failures) < limit:
        return None
    return (
        f"the engine failed {len(failures)} times while answering this request alone "
        f"(last: {failures[-1]}); it is not sent again"
    )
