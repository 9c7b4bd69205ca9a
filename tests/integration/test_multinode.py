"""Multi-node, for real on one machine: worker nodes join the service's Ray cluster
(`ray start --address`, each with its own resources), the engine pool places replicas
on them, one worker is killed mid-job, another joins mid-job. Every line exactly once
through all of it (the invariant checker)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import uuid

import psutil
import pytest
import ray

from raybatch.config import RunConfig
from raybatch.engines.pool_handle import NAMESPACE, pool_name
from raybatch.runner import run_job
from tests.helpers import InputBuilder, chat, check_run, invocations, wait_until

pytestmark = pytest.mark.slow

RAY = os.path.join(os.path.dirname(sys.executable), "ray")


class Worker:
    """One more raylet on this machine: no CPUs (the pipelines' tasks stay on the
    head), one engine slot, and a marker resource that names it."""

    def __init__(self, gcs_address: str, slot: str):
        self.marker = f"worker-{uuid.uuid4().hex[:8]}"
        resources = json.dumps({slot: 1, self.marker: 1})
        done = subprocess.run(
            [RAY, "start", f"--address={gcs_address}", "--num-cpus=0", f"--resources={resources}",
             "--disable-usage-stats", "--dashboard-agent-listen-port=0", "--metrics-export-port=0"],
            capture_output=True, text=True, timeout=120,
        )
        assert done.returncode == 0, done.stderr[-2000:]
        wait_until(lambda: self.node_id is not None, timeout=60, interval=0.5, message="the worker node did not join")

    @property
    def node_id(self):
        for node in ray.nodes():
            if node["Alive"] and self.marker in node["Resources"]:
                return node["NodeID"]
        return None

    def kill(self) -> None:
        """SIGKILL the raylet and everything under it: the node is lost, not stopped."""
        for process in psutil.process_iter(["cmdline"]):
            if self.marker in " ".join(process.info["cmdline"] or []):
                for child in process.children(recursive=True) + [process]:
                    try:
                        child.kill()
                    except psutil.NoSuchProcess:
                        pass

    def wait_gone(self) -> None:
        """Until the head has marked the node dead (missed heartbeats: tens of seconds
        after a SIGKILL). Before that Ray may still place work there: a later test's
        writer actor was once sent to a node killed here, and died with it."""
        wait_until(lambda: self.node_id is None, timeout=180, interval=1, message="a killed worker node still counts as alive")


def _replica_nodes(seen: dict, stop: threading.Event) -> None:
    """Poll the service's pool: every node where a replica had rows in flight."""
    pool = ray.get_actor(pool_name(os.environ["RAYBATCH_TEST_STORAGE"]), namespace=NAMESPACE)
    while not stop.is_set():
        for replica in ray.get(pool.replicas.remote()):
            if replica["state"] == "ready" and replica["node"] and replica["rowsInFlight"]:
                seen.setdefault(replica["node"], set()).add(replica["replicaId"])
        time.sleep(0.2)


def _run_in_thread(config: RunConfig):
    outcome: dict = {}
    thread = threading.Thread(target=lambda: outcome.update(summary=run_job(config)), daemon=True)
    thread.start()
    return thread, outcome


def _config(tmp_path, name: str, service, slot: str, replicas: int, lines: int,
            seconds_per_request: float) -> tuple[RunConfig, InputBuilder]:
    built = InputBuilder()
    for i in range(lines):
        built.ok("in.jsonl", f"{name}-{i}", chat(f"line {i}", max_tokens=8))
    built.write(str(tmp_path / name / "in"))
    config = RunConfig(
        input=str(tmp_path / name / "in"), output=str(tmp_path / name / "out"), model="scripted",
        engine_pool=pool_name(service.storage), account="multinode", part_max_rows=10, part_max_seconds=0.5,
        engine={"kind": "scripted", "max_replicas": replicas, "resources": {slot: 1},
                "max_num_seqs": 4, "batch_size": 2, "concurrent_batches": 8, "idle_seconds": 2,
                "engine_args": {"seconds_per_request": seconds_per_request, "invocations_dir": str(tmp_path / name / "calls")}},
    )
    return config, built


def _wait_for_calls(folder, count: int, thread) -> None:
    deadline = time.monotonic() + 120
    while sum(len(c) for c in invocations(folder).values()) < count:
        assert thread.is_alive() and time.monotonic() < deadline, "the job made no progress"
        time.sleep(0.2)


def test_replicas_follow_lost_and_new_worker_nodes(ray_cluster, service, tmp_path):
    os.environ["RAYBATCH_TEST_STORAGE"] = service.storage
    gcs = ray.get_runtime_context().gcs_address
    slot = f"engine-slot-{uuid.uuid4().hex[:6]}"  # only the workers have it
    workers = [Worker(gcs, slot), Worker(gcs, slot)]
    seen: dict = {}
    stop = threading.Event()
    watcher = threading.Thread(target=_replica_nodes, args=(seen, stop), daemon=True)
    watcher.start()
    try:
        # 1. One replica, on one of the two workers; its node is killed mid-job: the
        #    replica comes back on the other worker and the job loses nothing.
        config, built = _config(tmp_path, "lost", service, slot, replicas=1, lines=300, seconds_per_request=0.1)
        thread, outcome = _run_in_thread(config)
        _wait_for_calls(tmp_path / "lost" / "calls", 40, thread)
        [first] = [w for w in workers if w.node_id in seen]
        [other] = [w for w in workers if w is not first]
        other_node = other.node_id
        first.kill()
        thread.join(300)
        assert not thread.is_alive() and outcome["summary"].state == "completed"
        check_run(config.output, built.expected, calls_dir=tmp_path / "lost" / "calls")
        assert other_node in seen, "the replica did not come back on the surviving worker"

        # 2. Two replicas wanted, one slot left: a worker that joins mid-job takes the
        #    second replica, and it answers rows. Its rows are slower: on one replica the
        #    job lasts about 40 s, so it cannot end before the worker has joined and its
        #    replica started (at 0.1 s a row it once did, on a loaded CI machine).
        config, built = _config(tmp_path, "joined", service, slot, replicas=2, lines=300, seconds_per_request=0.5)
        thread, outcome = _run_in_thread(config)
        _wait_for_calls(tmp_path / "joined" / "calls", 30, thread)
        late = Worker(gcs, slot)
        workers.append(late)
        thread.join(300)
        assert not thread.is_alive() and outcome["summary"].state == "completed"
        check_run(config.output, built.expected, calls_dir=tmp_path / "joined" / "calls")
        assert late.node_id in seen, "no replica answered rows on the node that joined mid-job"
    finally:
        stop.set()
        for worker in workers:
            worker.kill()
        for worker in workers:
            worker.wait_gone()
