"""`ReplicaLifecycle`: the pool's replicas from start to stop. It places a new replica
(a GPU type that can serve it, with room, else an idle replica of another model gives
its GPUs back), starts it as a Ray actor, notices when it is ready, failed to start or
hung starting (`start_timeout_seconds`), scales each model between `min_replicas` and
`max_replicas` with its rows, and stops replicas that stayed idle. What a replica is
given to do is `engines/dispatch.py`'s.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
import uuid
from typing import Any, Callable, Optional

import ray

from raybatch.engines.dispatch import fail_waiting
from raybatch.events import log_replica
from raybatch.engines.pool_state import ModelState, ReplicaState
from raybatch.engines.replica import EngineReplica, ReplicaSpec, placement

logger = logging.getLogger(__name__)

REPLICA_ACTOR_OPTIONS: dict[str, Any] = {
    "max_restarts": 0,  # the pool replaces replicas itself, knowing their rows
    # An async actor: batches of rows (`submit`), the long poll (`collect`) and aborts
    # run on its loop together.
    "max_concurrency": 1_000,
}


class ReplicaLifecycle:
    def __init__(self, models: dict[str, ModelState], on_ready: Callable[[ModelState], None]):
        self._models = models  # the pool's, shared
        self._on_ready = on_ready  # a replica is ready: give it rows

    def scale(self, state: ModelState) -> None:
        """As many replicas as the model's rows (queued and in flight) fill, within its
        bounds; stop those idle past `idle_seconds`."""
        policy = state.policy
        waiting = len(state.queue) + len(state.suspects) + state.in_flight()
        wanted = math.ceil(waiting / policy.slots_per_replica) if waiting else 0
        target = min(policy.max_replicas, max(policy.min_replicas, wanted))
        live = state.live()
        for _ in range(target - len(live)):
            if not self.start(state):
                break
        now = time.time()
        for replica in list(state.replicas):
            idle = replica.idle and not len(state.queue) and not state.suspects
            if idle and now - replica.idle_since > policy.idle_seconds and len(state.live()) > policy.min_replicas:
                log_replica("stopping", state, replica, reason=f"idle for {policy.idle_seconds:g}s")
                self.stop(state, replica)

    def start(self, state: ModelState) -> bool:
        """Start one replica of the model; False when no GPU fits it now."""
        spec = state.pool_model.spec
        fits, accelerator = self.pick_accelerator(spec)
        if not fits:
            return False
        where = placement(spec, accelerator)
        options: dict[str, Any] = {
            "num_cpus": where.num_cpus,
            "num_gpus": where.num_gpus,
            "resources": where.resources or None,
            **REPLICA_ACTOR_OPTIONS,
        }
        if where.accelerator_type:
            options["accelerator_type"] = where.accelerator_type
        group = None
        if where.bundles:
            from ray.util.placement_group import placement_group
            from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

            group = placement_group(where.bundles, strategy=where.strategy)
            options = {
                "num_cpus": where.num_cpus,
                **REPLICA_ACTOR_OPTIONS,
                "scheduling_strategy": PlacementGroupSchedulingStrategy(
                    placement_group=group, placement_group_bundle_index=0,
                    placement_group_capture_child_tasks=True,
                ),
            }
        replica_id = f"replica-{uuid.uuid4().hex[:8]}"
        actor = ray.remote(EngineReplica).options(name=None, **options).remote(spec)
        replica = ReplicaState(replica_id, actor, accelerator, group)
        state.replicas.append(replica)
        log_replica("starting", state, replica)
        asyncio.ensure_future(self._await_ready(state, replica))
        return True

    def stop(self, state: ModelState, replica: ReplicaState) -> None:
        replica.state = "draining"
        if replica in state.replicas:
            state.replicas.remove(replica)
        if replica.collector is not None:
            replica.collector.cancel()  # its answers are no longer taken
        try:
            ray.kill(replica.actor, no_restart=True)
        except Exception:  # already gone
            pass
        if replica.placement_group is not None:
            ray.util.remove_placement_group(replica.placement_group)

    async def _await_ready(self, state: ModelState, replica: ReplicaState) -> None:
        try:
            info = await replica.actor.ready.remote()
        except Exception as error:
            if replica not in state.replicas:
                return  # stopped while starting
            message = str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__
            self._start_failed(state, replica, message)
            return
        if replica not in state.replicas:
            return
        replica.state, replica.node = "ready", info["node"]
        replica.idle_since = time.time()
        state.start_failures = 0
        log_replica("ready", state, replica)
        self._on_ready(state)

    def check_starts(self, state: ModelState) -> None:
        """The start watchdog: a replica still starting after `start_timeout_seconds`
        hung (a stuck load or compile, a GPU that never frees, resources that never
        come). Waiting for it longer would hold its model's rows (and its GPUs) for good."""
        timeout = state.policy.start_timeout_seconds
        now = time.monotonic()
        for replica in list(state.replicas):
            if replica.state == "starting" and now - replica.asked_at > timeout:
                self._start_failed(state, replica, f"not ready within {timeout:g}s (start_timeout_seconds): "
                                                   "its start hung")

    def _start_failed(self, state: ModelState, replica: ReplicaState, message: str) -> None:
        """Stop it and count it; at `max_start_failures` in a row the rows waiting for
        the model fail their jobs. Below that, the next scaling pass starts another."""
        log_replica("start_failed", state, replica, logging.ERROR, reason=message)
        self.stop(state, replica)
        state.start_failures += 1
        if state.start_failures >= state.policy.max_start_failures:
            fail_waiting(state, f"the engine for {state.pool_model.spec.model} failed to start "
                                f"{state.start_failures} times; last error: {message}")
            state.start_failures = 0

    # ------------------------------------------------------------- placement

    def pick_accelerator(self, spec: ReplicaSpec) -> tuple[bool, Optional[str]]:
        """(fits, accelerator type) for a new replica: a capable GPU type with room,
        after stopping idle replicas of other models if that is what it takes."""
        if spec.gpus == 0:
            return True, None
        for attempt in range(2):
            free = self._free_gpus()
            for kind, count in sorted(free.items(), key=lambda item: -item[1]):
                if count >= spec.gpus and (not spec.accelerator_types or kind in spec.accelerator_types):
                    return True, kind
            if attempt == 0 and not self._stop_one_idle_replica(spec):
                break
        return False, None

    def _free_gpus(self) -> dict[Optional[str], float]:
        """GPUs not held by a replica, per accelerator type (None: type unknown)."""
        free: dict[Optional[str], float] = {}
        for node in ray.nodes():
            if node.get("Alive") and node["Resources"].get("GPU"):
                types = [k.split(":", 1)[1] for k in node["Resources"] if k.startswith("accelerator_type:")]
                kind = types[0] if types else None
                free[kind] = free.get(kind, 0.0) + node["Resources"]["GPU"]
        for state in self._models.values():
            for replica in state.live():
                free[replica.accelerator_type] = free.get(replica.accelerator_type, 0.0) - state.pool_model.spec.gpus
        return free

    def _stop_one_idle_replica(self, spec: ReplicaSpec) -> bool:
        for state in self._models.values():
            if state.pool_model.spec.key == spec.key or len(state.queue) or state.suspects:
                continue
            for replica in state.replicas:
                if replica.idle and state.pool_model.spec.gpus:
                    log_replica("stopping", state, replica, reason=f"its GPUs go to {spec.model}")
                    self.stop(state, replica)
                    return True
        return False
