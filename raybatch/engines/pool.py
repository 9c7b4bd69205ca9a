"""`EnginePool`: the service's engines, shared by every job. One async Ray actor owns
every replica (`EngineReplica`) of every (model, precision, engine arguments) and feeds
them:

    jobs' engine stages ──submit(rows)──▶ per model: FairQueue (account → job)
                                            │ a replica's slot frees → next row by fair share
                                            ▼
                                          replicas, each ≤ admission_factor × max_num_seqs in flight
    answers ◀───────────────────────────── one call per row, so a finished row frees its slot at once

Why one pool actor with named replica actors, not Ray Serve deployments: fairness,
cancellation and fault handling all need one place that sees every row in flight on
every replica. Here a replica's death or hang is noticed where its rows are known, each
of them goes back to its own job's queue, poison rows are isolated across jobs, and a
cancelled job's rows are dropped from the queue and aborted inside the engine, without
a second bookkeeping layer beside Serve's router. The cost is one hop through this
actor per row (an async call, ~0.1 ms); see docs/performance.md.

Replicas start when rows wait and no replica can take them (or when a job being
validated asks to `warm` its model), scale up to `max_replicas` while rows queue, and
stop after `idle_seconds` without work, never below `min_replicas`. GPUs are divided
between models: a model that needs a replica and finds no free GPU stops an idle
replica of another model. Exactly-once output is not the pool's concern: a row answered
twice (after a failure) is committed once by the job's writer.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import math
import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional

import ray
from pydantic import BaseModel, ConfigDict

from raybatch.engines.failures import FailureLog, RowKey, budget_message, poison_message
from raybatch.engines.fair_queue import FairQueue
from raybatch.engines.replica import Answer, EngineReplica, ReplicaInfo, ReplicaSpec, placement
from raybatch.exceptions import EngineFailure, EngineStartError
from raybatch.protocol import ErrorCode

if TYPE_CHECKING:
    from raybatch.config import EngineConfig
    from raybatch.precision import EnginePlan

logger = logging.getLogger(__name__)

NAMESPACE = "raybatch"
WATCH_INTERVAL_SECONDS = 0.5


class PoolPolicy(BaseModel):
    """How the pool runs one model's replicas (from the job's EngineConfig)."""

    model_config = ConfigDict(extra="forbid")

    min_replicas: int = 0
    max_replicas: int = 1
    idle_seconds: float = 300
    slots_per_replica: int = 320  # admission_factor x max_num_seqs
    request_timeout_seconds: float = 600
    max_failures_per_row: int = 2
    max_engine_failures_per_job: int = 5
    max_start_failures: int = 3


class PoolModel(BaseModel):
    """A model as a job asks the pool for it: what to run, how to run it, and the name
    the job serves it under (shown by `raybatch engines`)."""

    model_config = ConfigDict(extra="forbid")

    spec: ReplicaSpec
    policy: PoolPolicy
    served_name: str


class JobTicket(BaseModel):
    """Who is sending rows: fairness is per account, then per job; failure records go
    to the job's output. `run_id` is one attempt of the job (a driver), so that ending a
    job also drops what an earlier, dead attempt had queued."""

    model_config = ConfigDict(extra="forbid")

    account: str
    job: str  # the job's output location: stable across attempts
    run_id: str


@dataclass(eq=False)
class _Row:
    run_id: str
    key: RowKey
    request_json: str
    answer: asyncio.Future
    suspect: bool = False

    def kind(self) -> Optional[str]:
        return json.loads(self.request_json).get("kind")


@dataclass(eq=False)
class _InFlight:
    row: _Row
    ref: Any  # the ObjectRef of the replica call
    since: float  # when the replica got it: the hang watchdog counts from here


@dataclass(eq=False)
class _Replica:
    replica_id: str
    actor: Any
    accelerator_type: Optional[str]
    placement_group: Any = None
    state: str = "starting"  # starting | ready | draining
    node: Optional[str] = None
    in_flight: dict[int, _InFlight] = field(default_factory=dict)
    idle_since: float = field(default_factory=time.time)
    running_suspect: bool = False  # a suspect row runs here alone
    held_for_suspect: bool = False  # takes no new rows: a suspect waits for it to drain


@dataclass(eq=False)
class _Model:
    pool_model: PoolModel
    queue: FairQueue = field(default_factory=FairQueue)
    suspects: list[_Row] = field(default_factory=list)  # each runs alone on a replica
    replicas: list[_Replica] = field(default_factory=list)
    start_failures: int = 0
    served_names: set[str] = field(default_factory=set)

    @property
    def policy(self) -> PoolPolicy:
        return self.pool_model.policy

    def live(self) -> list[_Replica]:
        return [r for r in self.replicas if r.state in ("starting", "ready")]

    def in_flight(self) -> int:
        return sum(len(r.in_flight) for r in self.replicas)


@dataclass(eq=False)
class _Job:
    ticket: JobTicket
    model: str  # key into the pool's models
    failures: FailureLog


class EnginePool:
    def __init__(self, account_weights: Optional[dict[str, float]] = None):
        self._models: dict[str, _Model] = {}
        self._runs: dict[str, _Job] = {}  # run_id → job
        self._ended_runs: set[str] = set()  # attempts whose job ended: their rows are refused
        self._weights = dict(account_weights or {})
        self._tokens = itertools.count()
        self._watcher: Optional[asyncio.Task] = None

    # -------------------------------------------------------------- for jobs

    async def submit(self, ticket: JobTicket, model: PoolModel, rows: list[tuple[str, int, str]]) -> list[Answer]:
        """Answer rows (shard, line, EngineRequest JSON) of one job, in order. Returns
        when every one is answered; raises EngineStartError when the model's engine
        cannot start."""
        if ticket.run_id in self._ended_runs:
            # Its job was cancelled, expired or re-queued while its driver still runs:
            # nothing more of this attempt reaches an engine.
            raise asyncio.CancelledError(f"job {ticket.job} has ended")
        job = await self._register(ticket, model)
        state = self._models[job.model]
        loop = asyncio.get_running_loop()
        pending = []
        for shard, line, request_json in rows:
            row = _Row(ticket.run_id, (shard, line), request_json, loop.create_future())
            pending.append(row.answer)
            self._enqueue(state, job, row)
        self._ensure_watcher()
        self._scale(job.model, state)
        self._dispatch(state)
        return list(await asyncio.gather(*pending))

    async def warm(self, model: PoolModel) -> None:
        """Start a replica of this model now if it has none (a job is being validated)."""
        state = self._model(model)
        self._ensure_watcher()
        if not state.live():
            self._start_replica(state)

    async def end_job(self, job: str, run_id: Optional[str] = None) -> int:
        """Drop every queued row of a job (all its attempts, or only `run_id`) and abort
        its rows inside the engines. The job's own engine stage gets nothing back for
        them; its driver is being stopped or has ended. Returns how many rows were
        dropped or aborted."""
        runs = {run for run, known in self._runs.items() if known.ticket.job == job and run_id in (None, run)}
        dropped = 0
        for state in self._models.values():
            for run in runs:
                for row in state.queue.remove_job(run):
                    row.answer.cancel()
                    dropped += 1
            kept = [row for row in state.suspects if row.run_id not in runs]
            dropped += len(state.suspects) - len(kept)
            for row in state.suspects:
                if row.run_id in runs:
                    row.answer.cancel()
            state.suspects = kept
            for replica in state.replicas:
                for token, entry in list(replica.in_flight.items()):
                    if entry.row.run_id in runs:
                        del replica.in_flight[token]
                        if entry.row.suspect:
                            replica.running_suspect = False
                        entry.row.answer.cancel()
                        ray.cancel(entry.ref)  # aborts the request inside the engine
                        dropped += 1
            self._dispatch(state)
        for run in runs:
            del self._runs[run]
        self._ended_runs |= runs
        return dropped

    # ------------------------------------------------------------ inspection

    async def replicas(self) -> list[dict]:
        infos = []
        for state in self._models.values():
            spec = state.pool_model.spec
            for replica in state.replicas:
                infos.append(
                    ReplicaInfo(
                        replica_id=replica.replica_id,
                        model=", ".join(sorted(state.served_names)) or spec.model,
                        precision_key=spec.key,
                        node=replica.node,
                        gpus=spec.gpus,
                        accelerator_type=replica.accelerator_type,
                        state="draining" if replica.held_for_suspect else replica.state,
                        rows_in_flight=len(replica.in_flight),
                        rows_queued=len(state.queue) + len(state.suspects),
                        idle_since=None if replica.in_flight else replica.idle_since,
                    ).model_dump(mode="json", by_alias=True)
                )
        return infos

    async def shutdown(self) -> None:
        for state in self._models.values():
            for replica in list(state.replicas):
                self._stop_replica(state, replica)

    # -------------------------------------------------------------- queueing

    async def _register(self, ticket: JobTicket, model: PoolModel) -> _Job:
        job = self._runs.get(ticket.run_id)
        if job is None:
            # The job's failure records: rows that failed replicas before this attempt.
            failures = await asyncio.to_thread(FailureLog, ticket.job)
            job = self._runs.setdefault(ticket.run_id, _Job(ticket, self._model(model).pool_model.spec.key, failures))
        self._models[job.model].served_names.add(model.served_name)
        return job

    def _model(self, model: PoolModel) -> _Model:
        key = model.spec.key
        state = self._models.get(key)
        if state is None:
            state = self._models[key] = _Model(model)
        else:
            state.pool_model = model  # the latest settings win (a changed catalog)
        for account, weight in self._weights.items():
            state.queue.set_weight(account, weight)
        return state

    def _enqueue(self, state: _Model, job: _Job, row: _Row, front: bool = False) -> None:
        failures = job.failures
        spent = budget_message(failures, state.policy.max_engine_failures_per_job)
        if spent:
            row.answer.set_result((row.kind(), None, ErrorCode.ENGINE_ERROR.value, spent))
            return
        if failures.is_suspect(row.key):
            poisoned = poison_message(failures.failures_alone(row.key), state.policy.max_failures_per_row)
            if poisoned:
                row.answer.set_result((row.kind(), None, ErrorCode.ENGINE_ERROR.value, poisoned))
                return
            row.suspect = True
            state.suspects.append(row)
        else:
            state.queue.push(job.ticket.account, row.run_id, row, front=front)

    def _dispatch(self, state: _Model) -> None:
        """Fill every free slot: suspects first, each alone on a replica; then rows by
        fair share, always to the replica with the fewest in flight."""
        ready = [r for r in state.replicas if r.state == "ready"]
        if not state.suspects:  # none waits (any more): nothing is held back for one
            for replica in ready:
                replica.held_for_suspect = False
        while state.suspects and ready:
            empty = [r for r in ready if not r.in_flight and not r.running_suspect]
            if not empty:
                if not any(r.held_for_suspect for r in ready):
                    # Let the least busy replica drain; the others go on serving.
                    min(ready, key=lambda r: len(r.in_flight)).held_for_suspect = True
                break
            replica = empty[0]
            row = state.suspects.pop(0)
            if row.answer.done():
                continue
            replica.held_for_suspect = False
            replica.running_suspect = True
            self._send(state, replica, row)
        open_replicas = [r for r in ready if not r.running_suspect and not r.held_for_suspect]
        slots = state.policy.slots_per_replica
        while open_replicas and len(state.queue):
            replica = min(open_replicas, key=lambda r: len(r.in_flight))
            if len(replica.in_flight) >= slots:
                break
            _, _, row = state.queue.pop()
            if not row.answer.done():
                self._send(state, replica, row)

    def _send(self, state: _Model, replica: _Replica, row: _Row) -> None:
        token = next(self._tokens)
        ref = replica.actor.generate.remote(row.request_json)
        replica.in_flight[token] = _InFlight(row, ref, time.monotonic())
        asyncio.ensure_future(self._receive(state, replica, token, ref))

    async def _receive(self, state: _Model, replica: _Replica, token: int, ref) -> None:
        try:
            answer = await ref
        except (ray.exceptions.TaskCancelledError, asyncio.CancelledError):
            return  # its job ended (end_job already freed the slot)
        except ray.exceptions.RayTaskError as error:
            cause = error.cause if isinstance(error.cause, Exception) else error
            reason = str(cause) if isinstance(cause, EngineFailure) else f"{type(cause).__name__}: {cause}"
            self._replica_failed(state, replica, reason)
            return
        except ray.exceptions.RayActorError as error:
            self._replica_failed(state, replica, f"engine replica died: {str(error).splitlines()[0]}")
            return
        entry = replica.in_flight.pop(token, None)
        if entry is None:
            return  # its replica was given up on (failure) or its job ended meanwhile
        if entry.row.suspect:
            replica.running_suspect = False
        if not entry.row.answer.done():
            entry.row.answer.set_result(answer)
        if not replica.in_flight:
            replica.idle_since = time.time()
        self._dispatch(state)

    # -------------------------------------------------------------- failures

    def _replica_failed(self, state: _Model, replica: _Replica, reason: str) -> None:
        """A replica died or hung: stop it, and send each row it had again, of every
        job. Rows that were in flight become suspects (they run alone from now on); a
        suspect that failed alone too often becomes an engine_error row."""
        if replica not in state.replicas:
            return  # already handled (every call in flight on it fails the same way)
        logger.error("engine replica %s failed: %s", replica.replica_id, reason)
        entries = list(replica.in_flight.values())
        replica.in_flight.clear()
        self._stop_replica(state, replica)
        alone = len(entries) == 1
        by_run: dict[str, list[_Row]] = {}
        for entry in entries:
            by_run.setdefault(entry.row.run_id, []).append(entry.row)
        exclusive = len(by_run) == 1
        for run_id, rows in by_run.items():
            job = self._runs.get(run_id)
            if job is None:
                continue  # its job ended
            record = job.failures.remember(reason, [row.key for row in rows], alone, exclusive)
            asyncio.ensure_future(self._write_failure(job, record))
            for row in rows:
                if not row.answer.done():
                    self._enqueue(state, job, row, front=True)
            self._answer_if_spent(state, job)
        self._scale(None, state)
        self._dispatch(state)

    def _answer_if_spent(self, state: _Model, job: _Job) -> None:
        """A job that has caused its limit of engine failures sends nothing more: its
        queued rows are answered engine_error now (rows in flight elsewhere finish)."""
        spent = budget_message(job.failures, state.policy.max_engine_failures_per_job)
        if not spent:
            return
        run_id = job.ticket.run_id
        rows = state.queue.remove_job(run_id) + [row for row in state.suspects if row.run_id == run_id]
        state.suspects = [row for row in state.suspects if row.run_id != run_id]
        for row in rows:
            if not row.answer.done():
                row.answer.set_result((row.kind(), None, ErrorCode.ENGINE_ERROR.value, spent))

    @staticmethod
    async def _write_failure(job: _Job, record) -> None:
        try:
            await asyncio.to_thread(job.failures.write, record)
        except Exception as error:  # the rows are retried either way
            logger.error("could not record an engine failure for %s: %s: %s", job.ticket.job, type(error).__name__, error)

    def _ensure_watcher(self) -> None:
        if self._watcher is None or self._watcher.done():
            self._watcher = asyncio.ensure_future(self._watch())

    async def _watch(self) -> None:
        """The hang watchdog and the scaler, twice a second."""
        while True:
            await asyncio.sleep(WATCH_INTERVAL_SECONDS)
            for key, state in list(self._models.items()):
                try:
                    self._check_hangs(state)
                    self._scale(key, state)
                    self._dispatch(state)
                except Exception:  # the watcher must outlive any one bad pass
                    logger.exception("engine pool pass failed for %s", key)

    def _check_hangs(self, state: _Model) -> None:
        timeout = state.policy.request_timeout_seconds
        now = time.monotonic()
        for replica in list(state.replicas):
            stuck = [e for e in replica.in_flight.values() if now - e.since > timeout]
            if stuck:
                custom_id = json.loads(stuck[0].row.request_json).get("custom_id")
                self._replica_failed(state, replica, f"request {custom_id!r} ran over {timeout:g}s: engine hung")

    # --------------------------------------------------------------- scaling

    def _scale(self, key: Optional[str], state: _Model) -> None:
        policy = state.policy
        waiting = len(state.queue) + len(state.suspects) + state.in_flight()
        wanted = math.ceil(waiting / policy.slots_per_replica) if waiting else 0
        target = min(policy.max_replicas, max(policy.min_replicas, wanted))
        live = state.live()
        for _ in range(target - len(live)):
            if not self._start_replica(state):
                break
        now = time.time()
        for replica in list(state.replicas):
            idle = replica.state == "ready" and not replica.in_flight and not len(state.queue) and not state.suspects
            if idle and now - replica.idle_since > policy.idle_seconds and len(state.live()) > policy.min_replicas:
                logger.info("stopping idle engine replica %s", replica.replica_id)
                self._stop_replica(state, replica)

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

    def _pick_accelerator(self, spec: ReplicaSpec) -> tuple[bool, Optional[str]]:
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

    def _stop_one_idle_replica(self, spec: ReplicaSpec) -> bool:
        for state in self._models.values():
            if state.pool_model.spec.key == spec.key or len(state.queue) or state.suspects:
                continue
            for replica in state.replicas:
                if replica.state == "ready" and not replica.in_flight and state.pool_model.spec.gpus:
                    logger.info("stopping idle replica %s to free GPUs for %s", replica.replica_id, spec.model)
                    self._stop_replica(state, replica)
                    return True
        return False

    def _start_replica(self, state: _Model) -> bool:
        spec = state.pool_model.spec
        fits, accelerator = self._pick_accelerator(spec)
        if not fits:
            return False
        where = placement(spec, accelerator)
        options: dict[str, Any] = {
            "num_cpus": where.num_cpus,
            "num_gpus": where.num_gpus,
            "resources": where.resources or None,
            "max_restarts": 0,  # the pool replaces replicas itself, knowing their rows
            "max_concurrency": 10_000,  # async actor: every slot is one call
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
                "max_restarts": 0,
                "max_concurrency": 10_000,
                "scheduling_strategy": PlacementGroupSchedulingStrategy(
                    placement_group=group, placement_group_bundle_index=0,
                    placement_group_capture_child_tasks=True,
                ),
            }
        replica_id = f"replica-{uuid.uuid4().hex[:8]}"
        actor = ray.remote(EngineReplica).options(name=None, **options).remote(spec)
        replica = _Replica(replica_id, actor, accelerator, group)
        state.replicas.append(replica)
        logger.info("starting engine replica %s of %s", replica_id, spec.model)
        asyncio.ensure_future(self._await_ready(state, replica))
        return True

    async def _await_ready(self, state: _Model, replica: _Replica) -> None:
        try:
            info = await replica.actor.ready.remote()
        except Exception as error:
            if replica not in state.replicas:
                return  # stopped while starting
            message = str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__
            logger.error("engine replica %s failed to start: %s", replica.replica_id, message)
            self._stop_replica(state, replica)
            state.start_failures += 1
            if state.start_failures >= state.policy.max_start_failures:
                self._fail_waiting(state, f"the engine for {state.pool_model.spec.model} failed to start "
                                          f"{state.start_failures} times; last error: {message}")
                state.start_failures = 0
            return
        if replica not in state.replicas:
            return
        replica.state, replica.node = "ready", info["node"]
        replica.idle_since = time.time()
        state.start_failures = 0
        logger.info("engine replica %s ready on node %s", replica.replica_id, replica.node)
        self._dispatch(state)

    def _fail_waiting(self, state: _Model, message: str) -> None:
        rows = list(state.queue) + state.suspects
        for run_id in {row.run_id for row in rows}:
            state.queue.remove_job(run_id)
        state.suspects = []
        for row in rows:
            if not row.answer.done():
                row.answer.set_exception(EngineStartError(message))

    def _stop_replica(self, state: _Model, replica: _Replica) -> None:
        replica.state = "draining"
        if replica in state.replicas:
            state.replicas.remove(replica)
        try:
            ray.kill(replica.actor, no_restart=True)
        except Exception:  # already gone
            pass
        if replica.placement_group is not None:
            ray.util.remove_placement_group(replica.placement_group)


def pool_name(storage: str) -> str:
    """One pool per storage root, like the scheduler: two services never share one."""
    import hashlib

    return f"raybatch-engines-{hashlib.sha256(storage.encode()).hexdigest()[:12]}"


def pool_handle(name: str, account_weights: Optional[dict[str, float]] = None, detached: bool = True):
    """The named pool actor, created if it does not exist yet. Detached for the service
    (it outlives API replicas, the scheduler and job drivers; Ray restarts it if its
    process dies, and its replicas, owned by it, die with it); not for `raybatch run`."""
    options: dict[str, Any] = dict(
        name=name, namespace=NAMESPACE, get_if_exists=True, max_restarts=-1 if detached else 0,
        max_concurrency=10_000, num_cpus=0,
    )
    if detached:
        options["lifetime"] = "detached"
    return ray.remote(EnginePool).options(**options).remote(account_weights)


def pool_model_for(engine: "EngineConfig", plan: "EnginePlan", model: str, served_name: str, fixed: bool) -> PoolModel:
    """The pool's view of a job's model. `fixed`: `raybatch run`, whose own pool keeps
    exactly the planned replicas for the run; else the service's bounds."""
    max_replicas = engine.replicas or (plan.replicas if fixed else engine.max_replicas or plan.replicas)
    min_replicas = max_replicas if fixed or engine.replicas else min(engine.min_replicas, max_replicas)
    max_num_seqs = int(plan.engine_args.get("max_num_seqs", engine.max_num_seqs))
    spec = ReplicaSpec(
        kind=engine.kind,
        model=model,
        engine_args=plan.engine_args,
        cpu_kv_cache_gib=engine.cpu_kv_cache_gib,
        gpus=plan.gpus_per_replica,
        pipeline_parallel_size=plan.pipeline_parallel_size,
        accelerator_types=plan.accelerator_types,
        # The scripted test engine has no engine loop to protect.
        cpus=0 if engine.kind == "scripted" else engine.replica_cpus,
        resources=engine.resources,
    )
    policy = PoolPolicy(
        min_replicas=min_replicas,
        max_replicas=max_replicas,
        idle_seconds=engine.idle_seconds,
        slots_per_replica=math.ceil(engine.admission_factor * max_num_seqs),
        request_timeout_seconds=engine.request_timeout_seconds,
        max_failures_per_row=engine.max_failures_per_row,
        max_engine_failures_per_job=engine.max_engine_failures_per_job,
        max_start_failures=engine.max_start_failures,
    )
    return PoolModel(spec=spec, policy=policy, served_name=served_name)
