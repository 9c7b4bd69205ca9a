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


def test_on_a_busy_replica_nothing_is_held(monkeypatch, tmp_path):
    lead = model(lead_batch_seconds=30)
    engines, (replica,) = fake_pool(monkeypatch, lead, replicas=1)

    async def scenario():
        asyncio.ensure_future(engines.submit(ticket(tmp_path, "globex", "g"), lead, rows("g", 1)))
        await until(lambda: len(replica.open()) == 1)  # another job's row is in the engine
        job = ticket(tmp_path, "acme", "a")
        for prefix in ("a", "b"):
            asyncio.ensure_future(engines.submit(job, lead, rows(prefix, 2)))
        await until(lambda: len(replica.open()) == 5)  # its first batch would not be alone

    asyncio.run(scenario())


def test_rows_held_behind_a_lead_keep_their_accounts_share(monkeypatch, tmp_path):
    """Two accounts' jobs start together on an idle replica: the first to send leads and
    holds its other rows. Until the second sends, those rows keep the first account's
    share free; when the second sends, the lead is no longer alone and the held rows
    go at once, so both start together and each has its share of the slots (before:
    the second took every slot and the first waited a whole wave, 48 % done when the
    other completed; then, held until the lead was answered, the first's rows started
    5 s after the other's, 52 %)."""
    lead = model(lead_batch_seconds=30)
    engines, (replica,) = fake_pool(monkeypatch, lead, replicas=1)  # 10 slots
    acme, globex = ticket(tmp_path, "acme", "a"), ticket(tmp_path, "globex", "b")

    async def scenario():
        first = asyncio.ensure_future(engines.submit(acme, lead, rows("a", 2)))
        await until(lambda: len(replica.open()) == 2)
        held = [asyncio.ensure_future(engines.submit(acme, lead, rows(f"a-held{i}-", 4))) for i in range(2)]
        await asyncio.sleep(0.3)  # the watcher's passes change nothing while the lead holds
        while_alone = sorted(replica.open())
        other = asyncio.ensure_future(engines.submit(globex, lead, rows("b", 12)))
        await until(lambda: len(replica.open()) == 10)
        together = replica.open()
        while replica.open():
            replica.answer()
            await settle()
        return while_alone, together, [await first] + [await batch for batch in held] + [await other]

    while_alone, together, answers = asyncio.run(scenario())
    assert while_alone == ["a0", "a1"]
    # The lead (2 rows) is still unanswered: acme's held rows went when globex's came,
    # and each account has its half of the 10 slots.
    assert sum(row.startswith("a-held") for row in together) == 3
    assert sum(row.startswith("b") for row in together) == 5
    assert [len(batch) for batch in answers] == [2, 4, 4, 12]
