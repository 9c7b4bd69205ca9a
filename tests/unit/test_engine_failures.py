"""Poison rows: what the pool learns from a failed replica, per job, and keeps in the
job's output so a restarted pool knows it too (raybatch/engines/failures.py)."""

from __future__ import annotations

from raybatch.engines.failures import FailureLog, poison_message


def record(out: str, reason: str, keys: list, alone: bool) -> None:
    log = FailureLog(out)
    log.write(log.remember(reason, keys, alone))


def test_failures_alone_are_told_apart_from_shared_ones(tmp_path):
    out = str(tmp_path / "out")
    record(out, "engine died", [("a.jsonl", 3), ("a.jsonl", 4), ("b.jsonl", 1)], alone=False)
    record(out, "engine hung", [("a.jsonl", 3)], alone=True)
    # One row of this job, but another job's rows were on the replica too: not alone.
    record(out, "engine died with company", [("a.jsonl", 9)], alone=False)
    log = FailureLog(out)  # what a restarted pool reads
    assert log.is_suspect(("a.jsonl", 4)) and log.is_suspect(("b.jsonl", 1)) and log.is_suspect(("a.jsonl", 9))
    assert not log.is_suspect(("a.jsonl", 5))
    assert log.failures_alone(("a.jsonl", 3)) == ["engine hung"]
    assert log.failures_alone(("a.jsonl", 4)) == []  # only ever shared a failing engine
    assert log.failures_alone(("a.jsonl", 9)) == []
    assert poison_message(log.failures_alone(("a.jsonl", 3)), limit=2) is None
    record(out, "engine died again", [("a.jsonl", 3)], alone=True)
    message = poison_message(FailureLog(out).failures_alone(("a.jsonl", 3)), limit=2)
    assert message == (
        "the engine failed 2 times while answering this request alone "
        "(last: engine died again); it is not sent again"
    )


def test_remember_counts_at_once_before_anything_is_written(tmp_path):
    log = FailureLog(str(tmp_path / "out"))
    log.remember("engine hung", [("a.jsonl", 1)], alone=True)
    assert log.is_suspect(("a.jsonl", 1)) and log.failures_alone(("a.jsonl", 1)) == ["engine hung"]
    assert not FailureLog(str(tmp_path / "out")).is_suspect(("a.jsonl", 1))  # not written yet


def test_records_from_before_shared_replicas_still_count(tmp_path):
    """A record without `alone` was written when a replica held one job's rows only."""
    folder = tmp_path / "out" / "_raybatch" / "engine-failures"
    folder.mkdir(parents=True)
    (folder / "1-a.json").write_text('{"reason": "old", "in_flight": [["a.jsonl", 2]]}')
    assert FailureLog(str(tmp_path / "out")).failures_alone(("a.jsonl", 2)) == ["old"]


def test_an_empty_output_has_no_suspects(tmp_path):
    assert not FailureLog(str(tmp_path / "nothing-yet")).is_suspect(("a.jsonl", 1))
