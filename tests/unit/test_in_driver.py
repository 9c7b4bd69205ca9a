"""The in-driver executor of small inputs (pipeline/in_driver.py): every prepared row
reaches the engine stage once and comes out finished once, the window of batches at the
pool is bounded, answered batches move on in the order they are answered, and a
stage's error ends the stream with that error."""

from __future__ import annotations

import asyncio

import pyarrow as pa
import pytest

from raybatch.pipeline.in_driver import engine_batches, stream_in_driver


def _lines(count: int, per_table: int) -> list[pa.Table]:
    numbers = list(range(1, count + 1))
    return [pa.table({"line": numbers[i:i + per_table]}) for i in range(0, count, per_table)]


class SlowStage:
    """Answers a batch after a delay that falls with its first line, so later batches
    overtake earlier ones; records how many batches it held at once."""

    def __init__(self, fail_at_line: int | None = None):
        self.held = self.most_held = 0
        self.cancelled = 0
        self.fail_at_line = fail_at_line

    async def __call__(self, batch: pa.Table) -> pa.Table:
        self.held += 1
        self.most_held = max(self.most_held, self.held)
        try:
            first = batch.column("line")[0].as_py()
            if first == self.fail_at_line:
                raise RuntimeError(f"engine failed at line {first}")
            await asyncio.sleep(0.05 if first % 2 else 0.01)
            return batch
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        finally:
            self.held -= 1


def _finished(batch: pa.Table) -> pa.Table:
    return batch.append_column("finished", pa.array([True] * batch.num_rows))


def test_every_line_comes_out_finished_once_with_a_bounded_window():
    stage = SlowStage()
    out = list(stream_in_driver(iter(_lines(100, per_table=30)), lambda t: t, stage, _finished, batch_size=4, concurrent=3))
    lines = [line for batch in out for line in batch.column("line").to_pylist()]
    assert sorted(lines) == list(range(1, 101))
    assert all(all(batch.column("finished").to_pylist()) for batch in out)
    assert stage.most_held == 3
    # Answered order, not input order: a slow batch does not hold back the ones after it.
    assert lines != sorted(lines)


def test_the_prepare_stage_sees_every_read_table_once():
    prepared = []

    def prepare(table):
        prepared.append(table.num_rows)
        return table

    list(stream_in_driver(iter(_lines(50, per_table=20)), prepare, SlowStage(), _finished, batch_size=7, concurrent=2))
    assert prepared == [20, 20, 10]


def test_engine_batches_are_cut_to_size_within_each_table():
    sizes = [t.num_rows for t in engine_batches(iter(_lines(25, per_table=10)), 4)]
    assert sizes == [4, 4, 2, 4, 4, 2, 4, 1]


def test_a_stage_error_ends_the_stream_with_that_error_and_cancels_the_rest():
    stage = SlowStage(fail_at_line=9)
    with pytest.raises(RuntimeError, match="engine failed at line 9"):
        list(stream_in_driver(iter(_lines(40, per_table=40)), lambda t: t, stage, _finished, batch_size=4, concurrent=4))
    assert stage.held == 0 and stage.cancelled > 0


def test_a_caller_that_stops_early_leaves_nothing_running():
    stage = SlowStage()
    # Batches start at lines 1, 4, 7, 10: two fast, two slow (still held when the
    # first answer comes out).
    stream = stream_in_driver(iter(_lines(40, per_table=40)), lambda t: t, stage, _finished, batch_size=3, concurrent=4)
    next(stream)
    stream.close()  # the output cap was reached
    assert stage.held == 0 and stage.cancelled > 0
