"""The start watchdog (raybatch/engines/lifecycle.py): a replica that is still starting
after `start_timeout_seconds` is killed and counts as a failed start; the pool starts
another, and at `max_start_failures` in a row the rows waiting for the model fail their
jobs with a message that says why. The replicas run the scripted engine, built in a
thread in place of a Ray actor, so a start that hangs (`hang_at_start`, or the
`engine.start_hang` fault once) hangs for real and only the watchdog ends it."""

from __future__ import annotations

import asyncio
import json
import threading

import pytest
import ray

from raybatch import faults
from raybatch.config import EngineConfig, ServiceConfig
from raybatch.engines.pool import EnginePool
from raybatch.engines.pool_state import PoolModel, PoolPolicy, pool_model_for
from raybatch.engines.replica import EngineReplica, ReplicaSpec
from raybatch.engines.vllm_engine import build_engine
from raybatch.exceptions import EngineStartError
from raybatch.jobs.run_config import RunConfigBuilder
from raybatch.precision import EnginePlan
from raybatch.store import Store
from tests.pool_fakes import RemoteMethod, ticket

TIMEOUT = 0.3  # seconds; the pool's watcher looks twice a second


class ThreadActor:
    """`ray.remote(EngineReplica)...remote(spec)` without Ray: the engine is built in a
    daemon thread (a hung start blocks only that thread), `ready` answers once it is
    built, `ray.kill` makes `ready` fail as a killed actor's does."""

    started: list["ThreadActor"] = []

    def __init__(self, spec: ReplicaSpec) -> None:
        self.loop = asyncio.get_running_loop()
        self.built = self.loop.create_future()
        self.killed = False
        self.ready = RemoteMethod(lambda: asyncio.ensure_future(self._ready()))
        # The actor's own batch calls, on a replica around the built engine.
        self.submit, self.collect, self.abort = (
            RemoteMethod(lambda *args, name=name: asyncio.ensure_future(self._call(name, *args)))
            for name in ("submit", "collect", "abort")
        )
        threading.Thread(target=self._build, args=(spec,), daemon=True).start()
        ThreadActor.started.append(self)

    def _build(self, spec: ReplicaSpec) -> None:
        engine = build_engine(spec.kind, spec.model, spec.engine_args, spec.cpu_kv_cache_gib)
        replica = EngineReplica(spec, engine=engine)
        self.loop.call_soon_threadsafe(lambda: self.built.done() or self.built.set_result(replica))

    async def _ready(self) -> dict:
        await self.built
        return {"node": "this-process", "pid": 0}

    async def _call(self, name: str, *args):
        replica = await self.built
        return await getattr(replica, name)(*args)

    def kill(self) -> None:
        self.killed = True
        if not self.built.done():
            self.built.set_exception(ray.exceptions.ActorDiedError())


@pytest.fixture
def actors(monkeypatch, tmp_path):
    """Every replica the pool starts is a ThreadActor; faults armed under tmp_path."""
    ThreadActor.started = []
    remote = type("Remote", (), {"options": lambda self, **options: type("Opts", (), {"remote": staticmethod(ThreadActor)})()})
    monkeypatch.setattr(ray, "remote", lambda cls: remote())
    monkeypatch.setattr(ray, "kill", lambda actor, no_restart=True: actor.kill())
    monkeypatch.setenv(faults.FOLDER_VARIABLE, str(tmp_path / "faults"))
    (tmp_path / "faults").mkdir()
    return ThreadActor.started


def model(engine_args: dict, max_start_failures: int = 2) -> PoolModel:
    policy = PoolPolicy(max_replicas=1, start_timeout_seconds=TIMEOUT, max_start_failures=max_start_failures)
    return PoolModel(spec=ReplicaSpec(kind="scripted", model="scripted", engine_args=engine_args, cpus=0),
                     policy=policy, served_name="scripted")


def requests(count: int) -> list:
    body = {"kind": "chat", "messages": [{"role": "user", "content": "hello"}], "sampling": {}, "max_tokens": 3}
    return [("in.jsonl", i + 1, json.dumps({"custom_id": f"r{i}", **body})) for i in range(count)]


def test_a_start_that_always_hangs_fails_the_waiting_rows_with_a_clear_error(actors, tmp_path):
    hung = model({"hang_at_start": True}, max_start_failures=2)

    async def scenario():
        with pytest.raises(EngineStartError) as failed:
            await asyncio.wait_for(EnginePool().submit(ticket(tmp_path, "acme", "a"), hung, requests(3)), 10)
        return failed.value

    error = asyncio.run(scenario())
    assert str(error) == ("the engine for scripted failed to start 2 times; last error: "
                          f"not ready within {TIMEOUT:g}s (start_timeout_seconds): its start hung")
    assert len(actors) == 2 and all(actor.killed for actor in actors)  # each killed, none left


def test_a_start_that_hangs_once_is_retried_and_the_rows_are_answered(actors, tmp_path):
    (tmp_path / "faults" / "engine.start_hang.json").write_text('{"after": 1}')

    async def scenario():
        pool = EnginePool()
        answers = await asyncio.wait_for(pool.submit(ticket(tmp_path, "acme", "a"), model({}), requests(3)), 10)
        return answers, await pool.replicas()

    answers, replicas = asyncio.run(scenario())
    assert [json.loads(answer[1])["choices"][0]["text"] for answer in answers] == ["oll"] * 3  # "hello" reversed
    assert (tmp_path / "faults" / "engine.start_hang.fired").exists()
    assert [actor.killed for actor in actors] == [True, False]  # the hung one killed, the second served
    assert [replica["state"] for replica in replicas] == ["ready"]


def test_a_slow_start_within_the_timeout_is_not_a_failure(actors, tmp_path):
    """Only `starting` replicas past the timeout count: a ready one is never touched,
    however long ago it was started."""
    async def scenario():
        pool = EnginePool()
        await asyncio.wait_for(pool.submit(ticket(tmp_path, "acme", "a"), model({}), requests(1)), 10)
        await asyncio.sleep(3 * TIMEOUT + 0.5)  # the watcher passes over the ready replica
        return await pool.replicas()

    assert [replica["state"] for replica in asyncio.run(scenario())] == ["ready"]
    assert [actor.killed for actor in actors] == [False]


def test_the_start_timeout_is_set_per_catalog_model(tmp_path):
    """600 s unless the service's run defaults or a catalog entry say otherwise (a large
    GPU model loads for much longer than a small one)."""
    config = ServiceConfig(
        storage=str(tmp_path),
        models={"small": {"source": "scripted", "engine": {"kind": "scripted"}},
                "big": {"source": "scripted", "engine": {"kind": "scripted", "start_timeout_seconds": 3600}}},
        run_defaults={"engine": {"start_timeout_seconds": 900}},
    )
    builder = RunConfigBuilder(config, Store(config.storage), "pool")
    plan = EnginePlan(device="cpu", replicas=1, gpus_per_replica=0, engine_args={})

    def timeout(name: str) -> float:
        run = builder.for_model(name, input="i", output="o")
        return pool_model_for(run.engine, plan, run.model, name, fixed=False).policy.start_timeout_seconds

    assert (timeout("small"), timeout("big")) == (900, 3600)
    assert EngineConfig().start_timeout_seconds == PoolPolicy().start_timeout_seconds == 600
