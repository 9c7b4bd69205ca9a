"""A job started at the same moment as another gets its share of the slots
(engines/dispatch.py, share_caps): the scheduler announces each job it starts
(`EnginePool.expect`), and until that job's rows arrive, the accounts already sending
fill only their fair share of the slots. Without it the first job to send fills every
slot and the other waits a whole wave of generation (docs/performance.md: 4 %)."""

from __future__ import annotations

import asyncio

import pytest

from raybatch.engines.fair_queue import FairQueue
from raybatch.engines.pool_state import PoolModel, PoolPolicy
from raybatch.engines.replica import ReplicaSpec
from tests.pool_fakes import answer_all, fake_pool, rows, ticket, two_replica_model, until

MODEL = two_replica_model(slots_per_replica=2)


@pytest.fixture
def pool(monkeypatch):
    return fake_pool(monkeypatch, MODEL)


def test_the_queue_passes_over_skipped_accounts_and_keeps_their_turn():
    queue: FairQueue[str] = FairQueue()
    for row in ("a0", "a1", "a2"):
        queue.push("acme", "ja", row)
    queue.push("globex", "jb", "b0")
    assert queue.pop(skip={"acme"})[2] == "b0"
    assert queue.pop(skip={"acme"}) is None  # only acme's rows wait
    assert [queue.pop()[2] for _ in range(3)] == ["a0", "a1", "a2"]


def test_a_job_sending_first_leaves_the_arriving_jobs_share_free(pool, tmp_path):
    engines, fakes = pool

    def open_calls() -> list[str]:
        return [c for fake in fakes for c in fake.open()]

    async def scenario():
        await engines.expect(MODEL, "globex")
        a = asyncio.ensure_future(engines.submit(ticket(tmp_path, "acme", "a"), MODEL, rows("a", 8)))
        await until(lambda: len(open_calls()) == 2)
        await asyncio.sleep(0.7)  # the watcher's passes change nothing: globex is still coming
        assert sorted(open_calls()) == ["a0", "a1"]  # half of the 4 slots
        b = asyncio.ensure_future(engines.submit(ticket(tmp_path, "globex", "b"), MODEL, rows("b", 2)))
        await until(lambda: len(open_calls()) == 4)
        assert sorted(open_calls()) == ["a0", "a1", "b0", "b1"]  # globex found its slots free
        await answer_all(fakes)
        assert not engines._models[MODEL.spec.key].account_in_flight
        return await a, await b

    answers_a, answers_b = asyncio.run(scenario())
    assert len(answers_a) == 8 and len(answers_b) == 2


def test_a_job_that_never_arrives_gives_its_share_back(pool, tmp_path):
    engines, fakes = pool

    async def scenario():
        await engines.expect(MODEL, "globex", seconds=0.2)
        a = asyncio.ensure_future(engines.submit(ticket(tmp_path, "acme", "a"), MODEL, rows("a", 4)))
        await until(lambda: sum(len(f.open()) for f in fakes) == 4)  # the watcher, once 0.2 s passed
        await answer_all(fakes)
        return await a

    assert len(asyncio.run(scenario())) == 4


def test_no_job_arriving_means_no_caps(pool, tmp_path):
    engines, fakes = pool

    async def scenario():
        a = asyncio.ensure_future(engines.submit(ticket(tmp_path, "acme", "a"), MODEL, rows("a", 4)))
        await until(lambda: sum(len(f.open()) for f in fakes) == 4)
        await answer_all(fakes)
        return await a

    assert len(asyncio.run(scenario())) == 4


def test_the_engines_running_rows_are_shared_before_its_queue(monkeypatch, tmp_path):
    """An engine runs its first max_num_seqs rows (here 2) and queues the rest of its
    slots (4) by arrival. The account that sent first gets its share of the running
    rows only, until the arriving one has its share: then the engine runs one row of
    each, not two of the first (a lead that would last every wave; measured: the other
    job 52 % done when the first completed)."""
    model = PoolModel(
        spec=ReplicaSpec(kind="scripted", model="m", engine_args={}),
        policy=PoolPolicy(min_replicas=1, max_replicas=1, slots_per_replica=4, running_per_replica=2),
        served_name="m",
    )
    engines, (fake,) = fake_pool(monkeypatch, model, replicas=1)

    async def scenario():
        await engines.expect(model, "globex")
        a = asyncio.ensure_future(engines.submit(ticket(tmp_path, "acme", "a"), model, rows("a", 8)))
        await until(lambda: len(fake.open()) == 1)
        await asyncio.sleep(0.3)
        assert fake.open() == ["a0"]  # half of the running rows, not half of the slots
        b = asyncio.ensure_future(engines.submit(ticket(tmp_path, "globex", "b"), model, rows("b", 4)))
        await until(lambda: len(fake.open()) == 4)
        assert fake.open() == ["a0", "b0", "a1", "b1"]  # the engine runs a0 and b0
        await answer_all([fake])
        return await a, await b

    answers_a, answers_b = asyncio.run(scenario())
    assert len(answers_a) == 8 and len(answers_b) == 4
