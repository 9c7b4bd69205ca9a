"""Poison rows: what a failed engine leaves for its replacement, and the gate that sends a
suspect row to the engine alone (raybatch/pipeline/engine_failures.py)."""

from __future__ import annotations

import asyncio

from raybatch.pipeline.engine_failures import EngineGate, FailureLog, poison_message


def test_failures_alone_are_told_apart_from_shared_ones(tmp_path):
    out = str(tmp_path / "out")
    FailureLog(out).record("engine died", [("a.jsonl", 3), ("a.jsonl", 4), ("b.jsonl", 1)])
    FailureLog(out).record("engine hung", [("a.jsonl", 3)])
    log = FailureLog(out)  # what the next engine actor reads
    assert log.is_suspect(("a.jsonl", 4)) and log.is_suspect(("b.jsonl", 1))
    assert not log.is_suspect(("a.jsonl", 5))
    assert log.failures_alone(("a.jsonl", 3)) == ["engine hung"]
    assert log.failures_alone(("a.jsonl", 4)) == []  # only ever shared a failing engine
    assert poison_message(log.failures_alone(("a.jsonl", 3)), limit=2) is None
    FailureLog(out).record("engine died again", [("a.jsonl", 3)])
    message = poison_message(FailureLog(out).failures_alone(("a.jsonl", 3)), limit=2)
    assert message == (
        "the engine failed 2 times while answering this request alone "
        "(last: engine died again); it is not sent again"
    )


def test_an_empty_output_has_no_suspects(tmp_path):
    assert not FailureLog(str(tmp_path / "nothing-yet")).is_suspect(("a.jsonl", 1))


def test_a_suspect_runs_alone_and_ordinary_rows_run_together():
    gate = EngineGate()
    seen: list[tuple[str, int]] = []  # (row, rows in flight while it ran)

    async def row(name: str, suspect: bool, delay: float) -> None:
        await asyncio.sleep(delay)
        async with gate.enter((name, 0), suspect):
            seen.append((name, len(gate.in_flight)))
            await asyncio.sleep(0.05)

    async def main() -> None:
        await asyncio.gather(
            row("a", False, 0), row("b", False, 0),  # together
            row("suspect", True, 0.01),  # waits for a and b, then alone
            row("c", False, 0.02),  # arrives while the suspect waits: held back
        )

    asyncio.run(main())
    assert seen == [("a", 1), ("b", 2), ("suspect", 1), ("c", 1)]
    assert gate.in_flight == {}
