"""The engine pool's dispatch, without Ray (raybatch/engines/dispatch.py): fake replicas
whose calls the test answers one by one, so the order in which rows reach engines, the
refill of a freed slot, a failed replica's rows and the suspect rule are exact."""

from __future__ import annotations

import asyncio
import json

import pytest

from tests.pool_fakes import answer_all, fake_pool, rows, settle, ticket, two_replica_model, until

MODEL = two_replica_model(slots_per_replica=1)


@pytest.fixture
def pool(monkeypatch):
    return fake_pool(monkeypatch, MODEL)


def test_a_freed_slot_takes_the_next_row_by_fair_share(pool, tmp_path):
    """acme's job fills both slots and queues two more rows; then globex's job arrives.
    Each freed slot goes to the account below its share of the slots in flight (one of
    two each): globex's first row takes the first slot freed, and from then on the two
    alternate (first come, first served would give a2, a3, b0, b1)."""
    engines, (one, two) = pool
    order: list[str] = []

    def seen() -> list[str]:
        order.extend(c for c in one.open() + two.open() if c not in order)
        return order

    async def scenario():
        a = asyncio.ensure_future(engines.submit(ticket(tmp_path, "acme", "a"), MODEL, rows("a", 4)))
        await until(lambda: len(seen()) == 2)
        b = asyncio.ensure_future(engines.submit(ticket(tmp_path, "globex", "b"), MODEL, rows("b", 2)))
        await until(lambda: len(engines._models[MODEL.spec.key].queue) == 4)
        while len(seen()) < 6:  # answer the oldest open call; its slot takes the next row
            oldest = order[min(order.index(c) for c in one.open() + two.open())]
            (one if oldest in one.open() else two).answer(0)
            await settle()
        for fake in (one, two):
            while fake.open():
                fake.answer()
                await settle()
        return await a, await b

    answers_a, answers_b = asyncio.run(scenario())
    assert order == ["a0", "a1", "b0", "a2", "b1", "a3"]
    assert [json.loads(answer[1])["answer"] for answer in answers_a] == ["a0", "a1", "a2", "a3"]
    assert [json.loads(answer[1])["answer"] for answer in answers_b] == ["b0", "b1"]


def test_a_failed_replicas_rows_run_again_alone_and_nothing_else_waits_for_them(pool, tmp_path):
    engines, (one, two) = pool

    async def scenario():
        job = asyncio.ensure_future(engines.submit(ticket(tmp_path, "acme", "a"), MODEL, rows("a", 4)))
        await until(lambda: len(one.open() + two.open()) == 2)
        failed = one.open()
        one.fail_all()  # replica r0 dies with its row in flight
        await settle()
        state = engines._models[MODEL.spec.key]
        assert [r.replica_id for r in state.replicas] == ["r1"]
        assert [row.key for row in state.suspects] == [("in.jsonl", 1)]
        assert state.replicas[0].held_for_suspect  # r1 drains: the suspect will run alone
        two.answer()
        await settle()
        assert two.open() == failed  # alone: nothing else was sent beside it
        two.answer()
        await settle()
        while two.open():  # then the rest, normally
            two.answer()
            await settle()
        # Written off the loop, in a thread: under load it can still be on its way.
        await until(lambda: log.is_dir() and len(list(log.iterdir())) >= 1)
        assert not state.account_in_flight  # the failed replica's rows left the count
        return await job

    log = (tmp_path / "a" / "_raybatch" / "engine-failures")
    answers = asyncio.run(scenario())
    assert [json.loads(answer[1])["answer"] for answer in answers] == ["a0", "a1", "a2", "a3"]
    assert len(list(log.iterdir())) == 1  # written for the job it concerned


def test_ending_a_job_drops_its_rows_and_releases_a_replica_held_for_its_suspect(pool, tmp_path):
    engines, (one, two) = pool

    async def scenario():
        ended = asyncio.ensure_future(engines.submit(ticket(tmp_path, "acme", "ended"), MODEL, rows("e", 3)))
        await until(lambda: len(one.open() + two.open()) == 2)
        one.fail_all()  # its row becomes a suspect; r1 is held for it
        await settle()
        state = engines._models[MODEL.spec.key]
        assert state.suspects and state.replicas[0].held_for_suspect
        await engines.end_job(str(tmp_path / "ended"))
        assert not state.suspects and len(state.queue) == 0
        assert two.calls[0][1].cancelled()  # its request aborted in the engine
        other = asyncio.ensure_future(engines.submit(ticket(tmp_path, "globex", "other"), MODEL, rows("o", 1)))
        await until(lambda: two.open() == ["o0"])  # the replica is no longer held
        two.answer()
        await settle()
        assert not state.account_in_flight  # dropped and answered rows left the count
        with pytest.raises(asyncio.CancelledError):
            await ended
        with pytest.raises(asyncio.CancelledError):  # its driver, still stopping, sends more
            await engines.submit(ticket(tmp_path, "acme", "ended"), MODEL, rows("late", 1))
        assert "late0" not in one.open() + two.open()
        return await other

    assert len(asyncio.run(scenario())) == 1


def test_ending_one_run_leaves_the_other_attempts_of_its_job(pool, tmp_path):
    """`raybatch run` on a shared pool ends its own run when it stops (a failed run's
    rows would otherwise still take a replica's time); another attempt of the same
    job keeps its rows."""
    engines, (one, two) = pool

    async def scenario():
        failed = ticket(tmp_path, "acme", "job").model_copy(update={"run_id": "attempt-1"})
        resumed = failed.model_copy(update={"run_id": "attempt-2"})
        stale = asyncio.ensure_future(engines.submit(failed, MODEL, rows("f", 3)))
        fresh = asyncio.ensure_future(engines.submit(resumed, MODEL, rows("r", 1)))
        await until(lambda: len(one.open() + two.open()) == 2)
        assert await engines.end_job(failed.job, failed.run_id) == 3  # two queued or in flight, all of its three
        await until(lambda: (one.open() + two.open()) == ["r0"])
        (one if one.open() else two).answer()
        with pytest.raises(asyncio.CancelledError):
            await stale
        return await fresh

    assert [json.loads(answer[1])["answer"] for answer in asyncio.run(scenario())] == ["r0"]


def _prompts(pattern: str) -> list:
    """Rows whose prompts start with one of two long shared prefixes, in this order."""
    shared = {p: f"{p} " * 300 for p in set(pattern)}  # past the 512 characters that name a prefix
    return [("in.jsonl", i + 1, json.dumps({"custom_id": f"{p}{i}", "kind": "chat",
                                             "messages": [{"role": "system", "content": shared[p]},
                                                          {"role": "user", "content": f"question {i}"}]}))
            for i, p in enumerate(pattern)]


@pytest.mark.parametrize("affinity", [True, False])
def test_rows_that_share_a_prompt_prefix_go_to_the_same_replica(monkeypatch, tmp_path, affinity):
    """Two few-shot prefixes, A and B, arrive in pairs. With affinity each replica gets
    one prefix's rows (its prefix cache holds that prefix, computed once); off, the
    least busy replica takes each row and both replicas compute both prefixes."""
    model = two_replica_model(slots_per_replica=8)
    model = model.model_copy(update={"policy": model.policy.model_copy(update={"prefix_affinity": affinity})})
    engines, (one, two) = fake_pool(monkeypatch, model)

    async def scenario():
        job = asyncio.ensure_future(engines.submit(ticket(tmp_path, "acme", "a"), model, _prompts("AABBAABB")))
        await until(lambda: len(one.open() + two.open()) == 8)
        placed = ({c[0] for c in one.open()}, {c[0] for c in two.open()})
        await answer_all([one, two])
        await job
        return placed

    placed = asyncio.run(scenario())
    if affinity:
        assert placed == ({"A"}, {"B"})
    else:
        assert placed == ({"A", "B"}, {"A", "B"})


def test_affinity_yields_to_balance_when_one_prefix_has_every_row(monkeypatch, tmp_path):
    """All rows share one prefix: its replica takes rows until it is a quarter of the
    window (2 of 8 slots) busier than the other, then the prefix moves over, so the
    two stay within 2 rows of each other and neither idles."""
    model = two_replica_model(slots_per_replica=8)
    engines, (one, two) = fake_pool(monkeypatch, model)

    async def scenario():
        job = asyncio.ensure_future(engines.submit(ticket(tmp_path, "acme", "a"), model, _prompts("A" * 12)))
        await until(lambda: len(one.open() + two.open()) == 12)
        loads = (len(one.open()), len(two.open()))
        await answer_all([one, two])
        await job
        return loads

    first, second = asyncio.run(scenario())
    assert first + second == 12 and abs(first - second) <= 2
