"""Issue 10, item 11: a job's rows may cause at most `max_engine_failures_per_job`
engine failures; past it, its unanswered rows are engine_error rows and nothing more of
it reaches an engine. Failures shared with another job's rows count for neither.
Fake replicas (tests/pool_fakes.py), so the pool's decisions are exact."""

from __future__ import annotations

import asyncio

import pytest

from raybatch.engines.failures import FailureLog, budget_message
from raybatch.engines.pool_state import PoolModel, PoolPolicy
from raybatch.engines.replica import ReplicaSpec
from tests.pool_fakes import fake_pool, rows, settle, ticket, until


def model(slots: int, budget: int) -> PoolModel:
    policy = PoolPolicy(min_replicas=2, max_replicas=2, slots_per_replica=slots, max_engine_failures_per_job=budget)
    return PoolModel(spec=ReplicaSpec(kind="scripted", model="m", engine_args={}), policy=policy, served_name="m")


def test_at_its_limit_a_jobs_unanswered_rows_become_engine_error_rows(monkeypatch, tmp_path):
    pool_model = model(slots=1, budget=2)
    engines, (one, two) = fake_pool(monkeypatch, pool_model)

    async def scenario():
        job = asyncio.ensure_future(engines.submit(ticket(tmp_path, "acme", "a"), pool_model, rows("a", 6)))
        await until(lambda: len(one.open() + two.open()) == 2)
        one.fail_all()  # failure 1: only this job's row was there
        await settle()
        state = engines._models[pool_model.spec.key]
        assert len(state.queue) == 4 and len(state.suspects) == 1
        two.fail_all()  # failure 2: the limit
        await settle()
        assert len(state.queue) == 0 and not state.suspects
        records = tmp_path / "a" / "_raybatch" / "engine-failures"
        await until(lambda: records.is_dir() and len(list(records.iterdir())) == 2)  # written off the loop
        return await job

    answers = asyncio.run(scenario())
    expected = budget_message(FailureLog(str(tmp_path / "a")), 2)
    assert expected == ("this job's requests were all the engine had in flight at 2 engine failures, its limit "
                        "(max_engine_failures_per_job 2); its requests not yet answered are not sent")
    assert [answer[2:] for answer in answers] == [("engine_error", expected)] * 6
    assert len(one.calls) == len(two.calls) == 1  # nothing more was sent
    # A later attempt of the job (a restarted driver) reads the records: still spent.
    again = asyncio.run(engines.submit(ticket(tmp_path, "acme", "a").model_copy(update={"run_id": "a-2"}),
                                       pool_model, rows("a", 1)))
    assert again[0][2] == "engine_error"


def test_failures_shared_with_another_jobs_rows_count_for_neither(monkeypatch, tmp_path):
    pool_model = model(slots=2, budget=1)
    engines, (only,) = fake_pool(monkeypatch, pool_model, replicas=1)

    async def scenario():
        a = asyncio.ensure_future(engines.submit(ticket(tmp_path, "acme", "a"), pool_model, rows("a", 1)))
        b = asyncio.ensure_future(engines.submit(ticket(tmp_path, "globex", "b"), pool_model, rows("b", 1)))
        await until(lambda: len(only.open()) == 2)
        only.fail_all()  # both jobs' rows on it: nobody's own failure
        records = tmp_path / "a" / "_raybatch" / "engine-failures"
        await until(lambda: records.is_dir() and len(list(records.iterdir())) == 1)  # written off the loop
        return engines._runs["a"].failures.caused, engines._runs["b"].failures.caused

    assert asyncio.run(scenario()) == (0, 0)
    log = FailureLog(str(tmp_path / "a"))
    assert log.caused == 0 and log.is_suspect(("in.jsonl", 1))  # still a suspect, not blamed


def test_records_written_before_the_budget_count_only_when_alone(tmp_path):
    folder = tmp_path / "out" / "_raybatch" / "engine-failures"
    folder.mkdir(parents=True)
    (folder / "1-a.json").write_text('{"reason": "old", "in_flight": [["a.jsonl", 2]], "alone": true}')
    (folder / "2-b.json").write_text('{"reason": "old", "in_flight": [["a.jsonl", 3], ["a.jsonl", 4]], "alone": false}')
    assert FailureLog(str(tmp_path / "out")).caused == 1


@pytest.mark.parametrize("exclusive, caused", [(True, 1), (False, 0), (None, 0)])
def test_remember_counts_exclusive_failures(tmp_path, exclusive, caused):
    log = FailureLog(str(tmp_path / "out"))
    log.write(log.remember("engine died", [("a.jsonl", 1), ("a.jsonl", 2)], alone=False, exclusive=exclusive))
    assert log.caused == FailureLog(str(tmp_path / "out")).caused == caused
