"""The engine pool without Ray, for its unit tests (test_pool_dispatch, test_failure_budget,
test_pool_gpus, test_start_timeout): fake replicas whose calls the test answers one by
one, so the order in which rows reach engines and what a failure does are exact."""

from __future__ import annotations

import asyncio
import json

import ray

from raybatch.engines.pool import EnginePool
from raybatch.engines.pool_state import JobTicket, ModelState, PoolModel, PoolPolicy, ReplicaState
from raybatch.engines.replica import ReplicaSpec


def two_replica_model(slots_per_replica: int) -> PoolModel:
    """A scripted model kept at two replicas of `slots_per_replica` slots each."""
    return PoolModel(
        spec=ReplicaSpec(kind="scripted", model="m", engine_args={}),
        policy=PoolPolicy(min_replicas=2, max_replicas=2, slots_per_replica=slots_per_replica,
                          request_timeout_seconds=600),
        served_name="m",
    )


class FakeReplica:
    """A replica whose rows the test answers one by one: `submit`, `collect` and `abort`
    as the pool calls them, each row a future in `calls` (cancelled when aborted)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, asyncio.Future]] = []
        self._tokens: dict[asyncio.Future, int] = {}
        self._answered: list = []
        self._failure: Exception | None = None
        self._polls: list[asyncio.Future] = []
        self.submit = RemoteMethod(self._submit)
        self.collect = RemoteMethod(self._collect)
        self.abort = RemoteMethod(self._abort)

    def _submit(self, rows: list[tuple[int, str]]) -> asyncio.Future:
        for token, request_json in rows:
            future = asyncio.get_running_loop().create_future()
            self.calls.append((json.loads(request_json)["custom_id"], future))
            self._tokens[future] = token
        return _done()

    def _collect(self) -> asyncio.Future:
        poll = asyncio.get_running_loop().create_future()
        self._polls.append(poll)
        self._flush()
        return poll

    def _abort(self, tokens: list[int]) -> asyncio.Future:
        for _, future in self.calls:
            if self._tokens[future] in tokens and not future.done():
                future.cancel()
        return _done()

    def _flush(self) -> None:
        while self._polls and (self._answered or self._failure):
            poll = self._polls.pop(0)
            if self._answered:
                poll.set_result(self._answered)
                self._answered = []
            else:
                poll.set_exception(self._failure)

    def answer(self, index: int = 0) -> str:
        custom_id, future = [c for c in self.calls if not c[1].done()][index]
        answer = ("chat", json.dumps({"answer": custom_id}), None, None)
        future.set_result(answer)
        self._answered.append((self._tokens[future], answer))
        self._flush()
        return custom_id

    def fail_all(self) -> None:
        """The replica dies with its rows in flight."""
        for _, future in self.calls:
            if not future.done():
                future.set_exception(ray.exceptions.ActorDiedError())
                future.exception()  # seen: nobody else awaits it
        self._failure = ray.exceptions.ActorDiedError()
        self._flush()

    def open(self) -> list[str]:
        return [custom_id for custom_id, future in self.calls if not future.done()]


def _done() -> asyncio.Future:
    """What a call that answers nothing gives the caller to await."""
    future = asyncio.get_running_loop().create_future()
    future.set_result(None)
    return future


class RemoteMethod:
    """An actor method as the pool calls it: `method.remote(...)`."""

    def __init__(self, call) -> None:
        self.remote = call


def no_ray(monkeypatch) -> None:
    """Killing a replica: nothing to do for a fake."""
    monkeypatch.setattr(ray, "kill", lambda actor, no_restart=True: None)


def fake_pool(monkeypatch, model: PoolModel, replicas: int = 2) -> tuple[EnginePool, list[FakeReplica]]:
    """A pool whose model has `replicas` ready fakes and starts no others."""
    no_ray(monkeypatch)
    engines = EnginePool()
    engines.lifecycle.start = lambda state: False  # replicas are the test's fakes
    state = ModelState(model)
    fakes = [FakeReplica() for _ in range(replicas)]
    state.replicas = [ReplicaState(f"r{i}", fake, None, state="ready") for i, fake in enumerate(fakes)]
    engines._models[model.spec.key] = state
    return engines, fakes


def rows(prefix: str, count: int) -> list:
    return [("in.jsonl", i + 1, json.dumps({"custom_id": f"{prefix}{i}", "kind": "chat"})) for i in range(count)]


async def answer_all(fakes: list[FakeReplica]) -> None:
    """Answer every open call, oldest first on each replica, until none is open."""
    while any(fake.open() for fake in fakes):
        for fake in fakes:
            if fake.open():
                fake.answer()
        await settle()


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def until(condition, timeout: float = 5.0) -> None:
    """A job's first call reads its failure records in a thread: give it real time."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "the pool never got there"
        await asyncio.sleep(0.01)


def ticket(tmp_path, account: str, job: str) -> JobTicket:
    return JobTicket(account=account, job=str(tmp_path / job), run_id=job)
