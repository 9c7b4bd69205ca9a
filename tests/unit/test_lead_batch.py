"""A job's first batch goes ahead (raybatch/engines/pool.py, `lead_batch_seconds`): when
a replica is idle for it, its other batches wait until the first is answered, at most
`lead_batch_seconds`, so the first rows decode alone and come back fast; on a busy
replica nothing is held. Fake replicas, no Ray."""

from __future__ import annotations

import asyncio

import pytest

from raybatch.engines.pool_state import PoolModel, PoolPolicy
from raybatch.engines.replica import ReplicaSpec
from tests.pool_fakes import fake_pool, rows, settle, ticket, until


def model(lead_batch_seconds: float) -> PoolModel:
    return PoolModel(
        spec=ReplicaSpec(kind="scripted", model="m", engine_args={}),
        policy=PoolPolicy(min_replicas=1, max_replicas=1, slots_per_replica=10,
                          lead_batch_seconds=lead_batch_seconds),
        served_name="m",
    )


def test_the_later_batches_wait_for_the_first_to_be_answered(monkeypatch, tmp_path):
    lead = model(lead_batch_seconds=30)
    engines, (replica,) = fake_pool(monkeypatch, lead, replicas=1)
    job = ticket(tmp_path, "acme", "a")

    async def scenario():
        first = asyncio.ensure_future(engines.submit(job, lead, rows("a", 2)))
        await until(lambda: len(replica.open()) == 2)
        later = [asyncio.ensure_future(engines.submit(job, lead, rows(f"b{i}-", 2))) for i in range(2)]
        await asyncio.sleep(0.2)
        held = replica.open()  # free slots, but the later batches wait for the first
        replica.answer()
        await settle()
        assert not first.done()  # the batch is answered whole
        replica.answer()
        await until(lambda: len(replica.open()) == 4)  # answered: the others go at once
        while replica.open():
            replica.answer()
            await settle()
        return held, await first, [await batch for batch in later]

    held, first, later = asyncio.run(scenario())
    assert held == ["a0", "a1"]
    assert len(first) == 2 and [len(batch) for batch in later] == [2, 2]


def test_a_slow_first_batch_holds_the_others_no_longer_than_the_setting(monkeypatch, tmp_path):
    lead = model(lead_batch_seconds=0.5)
    engines, (replica,) = fake_pool(monkeypatch, lead, replicas=1)
    job = ticket(tmp_path, "acme", "a")

    async def scenario():
        asyncio.ensure_future(engines.submit(job, lead, rows("a", 1)))
        await until(lambda: len(replica.open()) == 1)
        loop = asyncio.get_running_loop()
        asked = loop.time()
        asyncio.ensure_future(engines.submit(job, lead, rows("b", 1)))
        await until(lambda: len(replica.open()) == 2)  # the first is never answered
        return loop.time() - asked

    waited = asyncio.run(scenario())
    assert 0.2 < waited < 2.0  # from the job's first call, not from this one


def test_off_sends_every_batch_at_once(monkeypatch, tmp_path):
    lead = model(lead_batch_seconds=0)
    engines, (replica,) = fake_pool(monkeypatch, lead, replicas=1)
    job = ticket(tmp_path, "acme", "a")

    async def scenario():
        for prefix in ("a", "b", "c"):
            asyncio.ensure_future(engines.submit(job, lead, rows(prefix, 2)))
        await until(lambda: len(replica.open()) == 6)

    asyncio.run(scenario())


def test_a_held_batch_of_an_ended_job_never_reaches_an_engine(monkeypatch, tmp_path):
    lead = model(lead_batch_seconds=0.3)
    engines, (replica,) = fake_pool(monkeypatch, lead, replicas=1)
    job = ticket(tmp_path, "acme", "a")

    async def scenario():
        asyncio.ensure_future(engines.submit(job, lead, rows("a", 1)))
        await until(lambda: len(replica.open()) == 1)
        held = asyncio.ensure_future(engines.submit(job, lead, rows("b", 1)))
        await settle()
        await engines.end_job(job.job)
        with pytest.raises(asyncio.CancelledError):
            await held
        await asyncio.sleep(0.4)
        return [custom_id for custom_id, _ in replica.calls]

    assert asyncio.run(scenario()) == ["a0"]


def _past_its_lead(engines, replica, job, model):
    """A job whose lead batch was answered, with one row of a later batch in the engine:
    a replica busy with rows that hold nothing back."""

    async def steps():
        lead_batch = asyncio.ensure_future(engines.submit(job, model, rows("g", 1)))
        await until(lambda: replica.open() == ["g0"])
        replica.answer()
        await lead_batch
        asyncio.ensure_future(engines.submit(job, model, rows("h", 1)))
        await until(lambda: replica.open() == ["h0"])

    return steps()


def test_on_a_busy_replica_nothing_is_held(monkeypatch, tmp_path):
    lead = model(lead_batch_seconds=30)
    engines, (replica,) = fake_pool(monkeypatch, lead, replicas=1)

    async def scenario():
        await _past_its_lead(engines, replica, ticket(tmp_path, "globex", "g"), lead)
        job = ticket(tmp_path, "acme", "a")
        for prefix in ("a", "b"):
            asyncio.ensure_future(engines.submit(job, lead, rows(prefix, 2)))
        await until(lambda: len(replica.open()) == 5)  # its first batch would not be alone

    asyncio.run(scenario())


def test_jobs_created_together_each_lead_and_all_go_when_the_first_lead_is_answered(monkeypatch, tmp_path):
    """Two accounts' jobs start together on an idle replica. The second's lead finds only
    the first's lead in the engine, so it goes too and holds its job's other rows: both
    first batches decode beside a few others, in seconds (when the first job's rows went
    as soon as the second's came, both first rows came with the first whole wave, 14 s
    after create). When the first lead is answered, every held row goes, each account
    to its half of the slots: the engine fills again, and a lead beside a full engine
    would not come back sooner (measured: the second job's first row 4.1 s later than
    the first's when it held its rows to the end of its own lead, 0.5 s when not)."""
    lead = model(lead_batch_seconds=30)
    engines, (replica,) = fake_pool(monkeypatch, lead, replicas=1)  # 10 slots
    acme, globex = ticket(tmp_path, "acme", "a"), ticket(tmp_path, "globex", "b")

    async def scenario():
        seen = {}
        batches = [asyncio.ensure_future(engines.submit(acme, lead, rows("a", 2)))]
        await until(lambda: len(replica.open()) == 2)
        batches += [asyncio.ensure_future(engines.submit(acme, lead, rows(f"a-held{i}-", 4))) for i in range(2)]
        await settle()
        batches.append(asyncio.ensure_future(engines.submit(globex, lead, rows("b", 2))))
        await until(lambda: len(replica.open()) == 4)
        batches += [asyncio.ensure_future(engines.submit(globex, lead, rows(f"b-held{i}-", 4))) for i in range(2)]
        await asyncio.sleep(0.3)  # the watcher's passes change nothing while both leads hold
        seen["both leads"] = sorted(replica.open())
        replica.answer()
        replica.answer()  # acme's lead, a0 and a1
        await until(lambda: len(replica.open()) == 10)
        seen["acme's lead answered"] = replica.open()
        while replica.open():
            replica.answer()
            await settle()
        return seen, [await batch for batch in batches]

    seen, answers = asyncio.run(scenario())
    assert seen["both leads"] == ["a0", "a1", "b0", "b1"]
    released = seen["acme's lead answered"]
    assert {"b0", "b1"} <= set(released)  # globex's lead is still in the engine
    assert sum(row.startswith("a-held") for row in released) == 5
    assert sum(row.startswith("b-held") for row in released) == 3  # with b0 and b1, its half
    assert [len(batch) for batch in answers] == [2, 4, 4, 2, 4, 4]


def test_a_lead_stops_holding_when_a_new_job_finds_no_room_for_its_own(monkeypatch, tmp_path):
    """acme's lead holds alone; then another job's later rows join it in the engine, and
    a third job's lead comes: no replica runs leads alone any more, so that lead holds
    nothing, and acme's held rows go at once rather than wait for a lead that now
    decodes beside everything else (measured: 5 s behind the others, 52 % done when
    the other account's job completed)."""
    lead = model(lead_batch_seconds=30)
    engines, (replica,) = fake_pool(monkeypatch, lead, replicas=1)
    acme, globex, initech = (ticket(tmp_path, account, account[0]) for account in ("acme", "globex", "initech"))

    async def scenario():
        await _past_its_lead(engines, replica, globex, lead)
        replica.answer()  # h0: the replica is idle again
        await until(lambda: not replica.open())
        asyncio.ensure_future(engines.submit(acme, lead, rows("a", 1)))
        await until(lambda: replica.open() == ["a0"])
        asyncio.ensure_future(engines.submit(acme, lead, rows("a-held", 1)))
        asyncio.ensure_future(engines.submit(globex, lead, rows("later", 1)))
        await until(lambda: replica.open() == ["a0", "later0"])  # acme's held row waits
        asyncio.ensure_future(engines.submit(initech, lead, rows("i", 1)))
        await until(lambda: len(replica.open()) == 4)
        return sorted(replica.open())

    assert asyncio.run(scenario()) == ["a-held0", "a0", "i0", "later0"]
