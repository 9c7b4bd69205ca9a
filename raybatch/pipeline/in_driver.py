"""The pipeline of a small input, run in the job's driver process instead of by Ray Data.

The same stages in the same order (read → validate → preprocess → engine →
postprocess), the same functions Ray Data would call, and the same engine pool; only
the executor differs. Ray Data starts new worker processes for every job (its read
and postprocess tasks, the engine stage's actor): about 6 s on a two-core machine in
front of a job's first row, while a small input needs no more than one process to
read and prepare it. Larger inputs (`RunConfig.in_driver_bytes`) go through Ray Data,
which spreads their reading and preparation over the cluster.

Up to `concurrent` batches are at the pool at once, as with Ray Data's engine stage;
each answered batch moves on alone, in the order the pool answers them.
"""

from __future__ import annotations

import asyncio
from typing import Any, Callable, Iterator

import pyarrow as pa

from raybatch.pipeline.engine import EngineStage


def engine_batches(prepared: Iterator[pa.Table], batch_size: int) -> Iterator[pa.Table]:
    """Prepared tables cut into engine batches of `batch_size` rows (the last of each
    table may be shorter)."""
    for table in prepared:
        for start in range(0, table.num_rows, batch_size):
            yield table.slice(start, batch_size)


def stream_in_driver(
    lines: Iterator[pa.Table],
    prepare: Callable[[pa.Table], pa.Table],
    stage: EngineStage,
    finish: Callable[[pa.Table], pa.Table],
    batch_size: int,
    concurrent: int,
) -> Iterator[pa.Table]:
    """Finished output batches of the job's lines. `lines`: the read stage's batches;
    the three callables are the later stages. A stage's error ends the stream with that
    error, as it would end Ray Data's."""
    loop = asyncio.new_event_loop()
    batches = engine_batches((prepare(table) for table in lines), batch_size)
    pending: set[asyncio.Task[Any]] = set()
    try:
        while True:
            # Fill the window first: the pool answers while the caller writes.
            for batch in batches:
                pending.add(loop.create_task(stage(batch)))
                if len(pending) >= concurrent:
                    break
            if not pending:
                return
            done, pending = loop.run_until_complete(asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED))
            for task in done:
                yield finish(task.result())
    finally:
        for task in pending:
            task.cancel()
        if pending:
            loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        loop.close()
