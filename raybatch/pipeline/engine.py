"""Stage 4 — engine: a job's rows go to the engine pool and come back answered.

`EngineStage` is the `map_batches` callable of a job's pipeline. It holds no engine:
it hands each batch's requests to the engine pool (`engines/pool.py`), which queues
them with every other job's rows by fair share and answers each on a warm replica.
Rows that already carry an error pass through untouched. How many batches a job has at
the pool at once (its Ray Data concurrency) bounds its queued rows and their memory.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Awaitable, Callable

import pyarrow as pa
import ray
from pydantic import BaseModel

from raybatch.engines.pool_handle import NAMESPACE
from raybatch.engines.pool_state import JobTicket, PoolModel
from raybatch.exceptions import EngineStartError
from raybatch.pipeline.rows import ENGINE_SCHEMA, column

logger = logging.getLogger(__name__)

# A pool that died is restarted by Ray (the service's pool is detached with unlimited
# restarts); its rows are sent again. Past this many tries in a row the stage gives up
# and the job's attempt fails (the scheduler re-queues it).
POOL_TRIES = 5
POOL_RETRY_SECONDS = 2.0


class PoolAccess(BaseModel):
    """What a job's engine stage needs to reach the pool: its name, who is asking, and
    for which model."""

    pool_name: str
    ticket: JobTicket
    model: PoolModel


class EngineStage:
    def __init__(self, access: dict):
        access_ = PoolAccess.model_validate(access)
        self._pool_name = access_.pool_name
        # As JSON: the pool parses each once per job; objects would be pickled per batch.
        self._ticket, self._model = access_.ticket.model_dump_json(), access_.model.model_dump_json()
        self._pool = ray.get_actor(self._pool_name, namespace=NAMESPACE)

    async def _submit(self, rows: list[tuple[str, int, str]]) -> list:
        for attempt in range(1, POOL_TRIES + 1):
            try:
                return await self._pool.submit.remote(self._ticket, self._model, rows)
            except ray.exceptions.RayTaskError as error:
                if isinstance(error.cause, EngineStartError):
                    raise EngineStartError(str(error.cause)) from None
                raise
            except ray.exceptions.RayActorError as error:
                if attempt == POOL_TRIES:
                    raise
                logger.warning("engine pool unavailable (%s); trying again", str(error).splitlines()[0])
                await asyncio.sleep(POOL_RETRY_SECONDS)
                self._pool = ray.get_actor(self._pool_name, namespace=NAMESPACE)
        raise AssertionError("unreachable")

    async def __call__(self, batch: pa.Table) -> pa.Table:
        return await answer_batch(batch, self._submit)


async def answer_batch(batch: pa.Table, submit: Callable[[list[tuple[str, int, str]]], Awaitable[list]]) -> pa.Table:
    """A batch of REQUEST_SCHEMA rows → ENGINE_SCHEMA rows, the requests answered by
    `submit` (rows (shard, line, request JSON) → answers in the same order)."""
    shards, lines, requests = column(batch, "shard"), column(batch, "line"), column(batch, "request")
    asked = [i for i, request in enumerate(requests) if request is not None]
    answers = await submit([(shards[i], lines[i], requests[i]) for i in asked]) if asked else []
    by_row = dict(zip(asked, answers))
    none = (None, None, None, None)
    answered = [by_row.get(i, none) for i in range(len(requests))]
    return pa.Table.from_pydict(
        {
            "shard": shards,
            "line": lines,
            "custom_id": column(batch, "custom_id"),
            "kind": [a[0] for a in answered],
            "result": [a[1] for a in answered],
            "error_code": [a[2] or c for a, c in zip(answered, column(batch, "error_code"))],
            "error_message": [a[3] or m for a, m in zip(answered, column(batch, "error_message"))],
        },
        schema=ENGINE_SCHEMA,
    )
