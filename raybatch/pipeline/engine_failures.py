"""Engine failures and the rows that were in flight: so that one row that kills or hangs
the engine every time it is asked cannot restart engines forever.

When an engine dies or hangs, its actor writes what was in flight to the job's output
location before it exits (`_raybatch/engine-failures/<id>.json`), and every fresh engine
actor reads those records when it starts. A row that was in flight at a failure is a
suspect: it is sent to the engine alone, with nothing else in flight on that actor, so
that a failure while it runs is its own. A row that was alone on the engine at
`max_failures_per_row` failures is a poison row: it becomes an `engine_error` row and is
never sent again. Rows that only shared a failing engine are never blamed.
"""

from __future__ import annotations

import asyncio
import itertools
import time
import uuid
from contextlib import asynccontextmanager
from typing import AsyncIterator, Optional

from pydantic import BaseModel

from raybatch.storage import Location

FAILURES_DIR = "_raybatch/engine-failures"

RowKey = tuple[str, int]  # (shard, line)


class EngineFailureRecord(BaseModel):
    reason: str
    in_flight: list[RowKey]


class FailureLog:
    """The failures recorded so far for one output, read once per engine actor (a fresh
    actor is exactly what follows a failure)."""

    def __init__(self, output_url: str):
        self._out = Location(output_url)
        records = [
            EngineFailureRecord.model_validate_json(self._out.read_bytes(f"{FAILURES_DIR}/{name}"))
            for name in self._out.list(FAILURES_DIR)
            if name.endswith(".json")
        ]
        self._suspects: set[RowKey] = {tuple(key) for r in records for key in r.in_flight}
        self._alone: dict[RowKey, list[str]] = {}  # a row → reasons of failures it had alone
        for record in records:
            if len(record.in_flight) == 1:
                self._alone.setdefault(tuple(record.in_flight[0]), []).append(record.reason)

    def is_suspect(self, key: RowKey) -> bool:
        return key in self._suspects

    def failures_alone(self, key: RowKey) -> list[str]:
        return self._alone.get(key, [])

    def record(self, reason: str, in_flight: list[RowKey]) -> None:
        """Written just before the actor exits. Best effort: the actor goes either way,
        and without a record the rows are simply retried as if nothing were known."""
        record = EngineFailureRecord(reason=reason, in_flight=sorted(in_flight))
        # Named by time first, so that the sorted listing reads records in the order they
        # were written and a poison row's message names its latest failure.
        name = f"{time.time_ns():020d}-{uuid.uuid4().hex}.json"
        self._out.write_atomic(f"{FAILURES_DIR}/{name}", record.model_dump_json().encode())


class EngineGate:
    """Shared for ordinary rows, exclusive for suspects: a suspect waits until nothing
    else is in flight and holds new rows back while it runs. Tracks the rows in flight."""

    def __init__(self) -> None:
        self._changed = asyncio.Condition()
        self._exclusive = False
        self._suspects_waiting = 0
        self._tokens = itertools.count()
        self.in_flight: dict[int, RowKey] = {}

    @asynccontextmanager
    async def enter(self, key: RowKey, suspect: bool) -> AsyncIterator[None]:
        token = next(self._tokens)
        async with self._changed:
            if suspect:
                self._suspects_waiting += 1
                await self._changed.wait_for(lambda: not self._exclusive and not self.in_flight)
                self._suspects_waiting -= 1
                self._exclusive = True
            else:
                await self._changed.wait_for(lambda: not self._exclusive and not self._suspects_waiting)
            self.in_flight[token] = key
        try:
            yield
        finally:
            async with self._changed:
                del self.in_flight[token]
                if suspect:
                    self._exclusive = False
                self._changed.notify_all()


def poison_message(failures: list[str], limit: int) -> Optional[str]:
    """The engine_error message for a row that failed the engine alone `limit` times."""
    if len(failures) < limit:
        return None
    return (
        f"the engine failed {len(failures)} times while answering this request alone "
        f"(last: {failures[-1]}); it is not sent again"
    )
