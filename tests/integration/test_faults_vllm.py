"""The engine faults on the real vLLM CPU engine, injected from outside the way they
happen: the engine actor SIGKILLed; vLLM's engine-core process killed while the actor
lives (vLLM raises EngineDeadError); the engine-core process frozen (SIGSTOP) so
requests hang; the writer killed between a part and its commit. After each, the
invariant checker."""

from __future__ import annotations

import os
import signal
import threading
import time

import psutil
import pytest

from raybatch.config import RunConfig
from raybatch.engines.pool_handle import pool_name
from raybatch.runner import run_job
from tests.helpers import MAX_MODEL_LEN, InputBuilder, chat, check_run

pytestmark = pytest.mark.engine

LINES = 240


def _engine_pids() -> list[int]:
    """The run's vLLM replicas, newest first: replicas with engine processes of their
    own (the service's scripted replicas have none), started after the service's
    warm `tiny` replica, which is shared and must not be struck."""
    from ray.util.state import list_actors

    actors = list_actors(filters=[("state", "=", "ALIVE")], detail=True, limit=1000)
    replicas = [psutil.Process(a.pid) for a in actors if "EngineReplica" in (a.class_name or "")]
    with_engines = [p for p in replicas if p.children()]
    return [p.pid for p in sorted(with_engines, key=lambda p: p.create_time(), reverse=True)]


def _setup(tmp_path, tiny_model, service):
    """The run joins the service's engine pool, so that a replica warm from the test
    before spares it an engine start; `raybatch run`'s own pool is tested elsewhere
    (test_run_engine.py, the CLI tests)."""
    built = InputBuilder()
    for i in range(LINES):
        built.ok("in.jsonl", f"v-{i}", chat(f"count to {i}", max_tokens=16, temperature=0))
    built.write(str(tmp_path / "in"))
    config = RunConfig(
        input=str(tmp_path / "in"),
        output=str(tmp_path / "out"),
        model=tiny_model,
        engine_pool=pool_name(service.storage),
        part_max_rows=16,
        part_max_seconds=0.5,
        # max_model_len as in tests.helpers.ENGINE: replicas of its own (the cap test's
        # too), apart from the service's warm `tiny`, which other tests expect warm.
        engine={"batch_size": 4, "concurrent_batches": 2, "request_timeout_seconds": 20,
                "max_model_len": MAX_MODEL_LEN, "engine_args": {"enforce_eager": True}},
    )
    return built, config


def _committed(tmp_path) -> int:
    commits = tmp_path / "out" / "_raybatch" / "commits"
    return len(list(commits.iterdir())) if commits.exists() else 0


def _run_with(tmp_path, config, strike) -> object:
    """Run the job in a thread; once its first part is committed, `strike(actor_pid)`."""
    outcome: dict = {}
    runner = threading.Thread(target=lambda: outcome.update(summary=run_job(config)), daemon=True)
    runner.start()
    deadline = time.monotonic() + 300
    while _committed(tmp_path) < 1:
        assert time.monotonic() < deadline and runner.is_alive(), "no commit before the fault"
        time.sleep(0.2)
    pids = _engine_pids()
    assert pids, "no engine actor"
    strike(pids[0])
    runner.join(600)
    assert not runner.is_alive(), "the run hung"
    return outcome["summary"]


def _core_process(actor_pid: int) -> psutil.Process:
    """vLLM's engine-core: a child process of the engine actor."""
    children = psutil.Process(actor_pid).children(recursive=True)
    cores = [c for c in children if "EngineCore" in " ".join(c.cmdline()) or "EngineCore" in c.name()]
    return (cores or children)[0]


def test_engine_actor_sigkilled(ray_cluster, service, tiny_model, tmp_path):
    built, config = _setup(tmp_path, tiny_model, service)
    engine_processes: list[psutil.Process] = []

    def kill(pid: int) -> None:
        engine_processes.extend(psutil.Process(pid).children(recursive=True))
        os.kill(pid, signal.SIGKILL)

    summary = _run_with(tmp_path, config, kill)
    assert summary.state == "completed"
    check_run(str(tmp_path / "out"), built.expected)
    # vLLM's engine-core processes do not outlive the killed replica (they would keep
    # their memory, on a GPU their GPU memory, for good).
    assert engine_processes, "the replica had no engine processes to watch"
    gone, alive = psutil.wait_procs(engine_processes, timeout=10)
    assert not alive, f"engine processes outlived their replica: {alive}"


def test_engine_core_dies_while_its_actor_lives(ray_cluster, service, tiny_model, tmp_path):
    built, config = _setup(tmp_path, tiny_model, service)
    summary = _run_with(tmp_path, config, lambda pid: _core_process(pid).kill())
    assert summary.state == "completed"
    check_run(str(tmp_path / "out"), built.expected)  # no row blamed: no engine_error rows


def test_engine_hangs_and_the_watchdog_replaces_it(ray_cluster, service, tiny_model, tmp_path):
    built, config = _setup(tmp_path, tiny_model, service)
    frozen: list[psutil.Process] = []

    def freeze(pid: int) -> None:
        core = _core_process(pid)
        core.suspend()  # SIGSTOP: alive, silent
        frozen.append(core)

    started = time.monotonic()
    try:
        summary = _run_with(tmp_path, config, freeze)
    finally:
        for process in frozen:  # never leave a stopped process behind
            try:
                process.kill()
            except psutil.NoSuchProcess:
                pass
    assert summary.state == "completed"
    check_run(str(tmp_path / "out"), built.expected)
    assert time.monotonic() - started < 300


def test_writer_killed_between_part_and_commit(ray_cluster, service, faults, tiny_model, tmp_path):
    built, config = _setup(tmp_path, tiny_model, service)
    faults.arm("writer.crash", after=2)
    with pytest.raises(Exception):
        run_job(config)
    assert faults.fired("writer.crash")
    assert run_job(config).state == "completed"
    check_run(str(tmp_path / "out"), built.expected)
