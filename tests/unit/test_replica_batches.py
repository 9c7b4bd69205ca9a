"""The replica's batch calls (raybatch/engines/replica.py) on the scripted engine, in
this process: rows go in by batches (`submit`), come back as they finish (`collect`,
a long poll), an aborted row is never answered, and an engine failure comes back after
the answers finished before it."""

from __future__ import annotations

import asyncio
import json

import pytest

from raybatch import faults
from raybatch.engines.replica import EngineReplica, ReplicaSpec
from raybatch.exceptions import EngineFailure
from tests.helpers import Faults


def request(custom_id: str, text: str) -> str:
    return json.dumps({"custom_id": custom_id, "kind": "chat", "sampling": {}, "max_tokens": 8,
                       "messages": [{"role": "user", "content": text}]})


def replica(**engine_args) -> EngineReplica:
    return EngineReplica(ReplicaSpec(kind="scripted", model="scripted", engine_args=engine_args))


def test_a_batch_comes_back_by_tokens_and_collect_waits_for_one():
    async def scenario():
        engine = replica()
        poll = asyncio.ensure_future(engine.collect())
        await asyncio.sleep(0.05)
        assert not poll.done()  # nothing submitted, nothing answered: it waits
        await engine.submit([(7, request("a", "abc")), (8, request("b", "xyz"))])
        answers = dict(await poll)
        while len(answers) < 2:
            answers.update(await engine.collect())
        return answers

    answers = asyncio.run(scenario())
    assert {token: (kind, json.loads(result)["choices"][0]["text"], code) for token, (kind, result, code, _) in answers.items()} == {
        7: ("chat", "cba", None), 8: ("chat", "zyx", None)}


def test_a_finished_row_comes_back_before_a_slow_one_of_the_same_batch(tmp_path, monkeypatch):
    monkeypatch.setenv(faults.FOLDER_VARIABLE, str(tmp_path))
    Faults(tmp_path).arm("engine.poison", custom_id="slow", fault="hang")

    async def scenario():
        engine = replica()
        await engine.submit([(1, request("slow", "s")), (2, request("fast", "f"))])
        first = await asyncio.wait_for(engine.collect(), 5)
        await engine.abort([1])  # its job ended: aborted inside the engine
        await asyncio.sleep(0.05)
        return first, engine._running

    first, running = asyncio.run(scenario())
    assert [token for token, _ in first] == [2]
    assert running == {}  # the hung row's request was cancelled, and is never answered


def test_an_engine_failure_comes_after_the_answers_finished_before_it(tmp_path, monkeypatch):
    monkeypatch.setenv(faults.FOLDER_VARIABLE, str(tmp_path))
    Faults(tmp_path).arm("engine.poison", custom_id="bad", fault="die")

    async def scenario():
        engine = replica()
        await engine.submit([(1, request("good", "g"))])
        await asyncio.sleep(0.05)
        await engine.submit([(2, request("bad", "b"))])
        await asyncio.sleep(0.05)
        answered = await engine.collect()
        with pytest.raises(EngineFailure, match="scripted engine death"):
            await engine.collect()
        return answered

    assert [token for token, _ in asyncio.run(scenario())] == [1]

