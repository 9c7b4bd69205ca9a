"""How the engine pool divides GPUs between models (raybatch/engines/lifecycle.py), on logical
nodes: a new replica takes a free GPU of a type that can serve it, else an idle replica
of another model gives its GPUs back, else it waits."""

from __future__ import annotations

import pytest

import ray

from raybatch.engines.pool import EnginePool
from raybatch.engines.pool_state import ModelState, PoolModel, PoolPolicy, ReplicaState
from raybatch.engines.replica import ReplicaSpec


def spec(model: str, gpus: int, types=()) -> ReplicaSpec:
    return ReplicaSpec(kind="vllm", model=model, engine_args={}, gpus=gpus, accelerator_types=list(types))


def with_replicas(pool: EnginePool, model: str, gpus: int, busy: list[bool], kind="H100") -> ModelState:
    state = ModelState(PoolModel(spec=spec(model, gpus), policy=PoolPolicy(), served_name=model))
    for i, is_busy in enumerate(busy):
        replica = ReplicaState(f"{model}-{i}", actor=object(), accelerator_type=kind, state="ready")
        if is_busy:
            replica.in_flight[i] = object()
        state.replicas.append(replica)
    pool._models[state.pool_model.spec.key] = state
    return state


@pytest.fixture
def cluster(monkeypatch):
    nodes: list[dict] = []
    monkeypatch.setattr(ray, "nodes", lambda: nodes)
    monkeypatch.setattr(ray, "kill", lambda actor, no_restart=True: None)
    return nodes


def node(gpus: int, kind: str) -> dict:
    return {"Alive": True, "Resources": {"CPU": 16.0, "GPU": float(gpus), f"accelerator_type:{kind}": 1.0}}


def test_a_replica_takes_free_gpus_of_its_type(cluster):
    cluster += [node(8, "H100")]
    pool = EnginePool()
    with_replicas(pool, "other", 4, busy=[True])
    assert pool.lifecycle.pick_accelerator(spec("new", 4)) == (True, "H100")
    assert pool.lifecycle.pick_accelerator(spec("big", 8)) == (False, None)  # 4 of 8 are held, busy


def test_only_types_that_serve_the_precision_count(cluster):
    cluster += [node(8, "T4"), node(2, "H100")]
    pool = EnginePool()
    assert pool.lifecycle.pick_accelerator(spec("fp8", 2, types=["H100"])) == (True, "H100")
    assert pool.lifecycle.pick_accelerator(spec("fp8", 4, types=["H100"])) == (False, None)  # 8 T4s do not help
    assert pool.lifecycle.pick_accelerator(spec("bf16", 4)) == (True, "T4")


def test_an_idle_replica_of_another_model_gives_its_gpus_back(cluster):
    cluster += [node(8, "H100")]
    pool = EnginePool()
    other = with_replicas(pool, "other", 4, busy=[True, False])
    assert pool.lifecycle.pick_accelerator(spec("new", 4)) == (True, "H100")
    assert [r.replica_id for r in other.replicas] == ["other-0"]  # the idle one stopped


def test_busy_replicas_and_models_with_queued_rows_keep_their_gpus(cluster):
    cluster += [node(8, "H100")]
    pool = EnginePool()
    with_replicas(pool, "busy", 4, busy=[True])
    queued = with_replicas(pool, "queued", 4, busy=[False])
    queued.queue.push("acme", "job", object())  # rows wait for it: not idle
    assert pool.lifecycle.pick_accelerator(spec("new", 4)) == (False, None)
    assert len(queued.replicas) == 1


def test_cpu_replicas_need_no_gpu(cluster):
    cluster += [{"Alive": True, "Resources": {"CPU": 4.0}}]
    assert EnginePool().lifecycle.pick_accelerator(spec("cpu", 0)) == (True, None)
