"""`EnginePool`: the service's engines, shared by every job. One async Ray actor owns
every replica (`EngineReplica`) of every (model, precision, engine arguments) and feeds
them:

    jobs' engine stages ──submit(rows)──▶ per model: FairQueue (account → job)
                                            │ a replica's slot frees → next row by fair share
                                            ▼
                                          replicas, each ≤ admission_factor × max_num_seqs in flight
    answers ◀───────────────────────────── per replica, a long-poll `collect` of whatever finished,
                                          so a finished row frees its slot at once

Why one pool actor with named replica actors, not Ray Serve deployments: fairness,
cancellation and fault handling all need one place that sees every row in flight on
every replica. Here a replica's death or hang is noticed where its rows are known, each
of them goes back to its own job's queue, poison rows are isolated across jobs, and a
cancelled job's rows are dropped from the queue and aborted inside the engine, without
a second bookkeeping layer beside Serve's router. Rows go to a replica in one call per
dispatch pass (`submit`) and come back in one call per batch of finished rows
(`collect`), not one Ray call per row: that capped the pool at about 600 rows/s (see
docs/performance.md).

Replicas start when rows wait and no replica can take them (or when a job being
validated asks to `warm` its model), scale up to `max_replicas` while rows queue, and
stop after `idle_seconds` without work, never below `min_replicas`. GPUs are divided
between models: a model that needs a replica and finds no free GPU stops an idle
replica of another model. Exactly-once output is not the pool's concern: a row answered
twice (after a failure) is committed once by the job's writer.

This module is the actor: its calls, sending and receiving rows, and what a replica's
failure does to the rows it had. Beside it: `pool_state.py` (settings and bookkeeping),
`dispatch.py` (which row goes where), `lifecycle.py` (starting, placing, scaling and
stopping replicas), `pool_handle.py` (the actor's name and handle).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import time
from typing import Optional

import ray

from raybatch import metrics
from raybatch.engines.dispatch import answer_if_spent, dispatch, drop_runs, enqueue, quietly
from raybatch.engines.failures import FailureLog
from raybatch.engines.lifecycle import ReplicaLifecycle
from raybatch.engines.pool_state import InFlight, JobRun, JobTicket, ModelState, PoolModel, ReplicaState, Row
from raybatch.engines.replica import Answer, ReplicaInfo
from raybatch.events import log_replica
from raybatch.exceptions import EngineFailure

logger = logging.getLogger(__name__)

WATCH_INTERVAL_SECONDS = 0.5
# How long slots are kept for a started job's rows: a driver's start and Ray Data's
# (seconds); a driver that never sends gives its share back after this.
ARRIVAL_SECONDS = 30.0
# Tickets and models kept parsed (two per job attempt); past this the cache starts over.
MAX_PARSED = 4096


class EnginePool:
    def __init__(self, account_weights: Optional[dict[str, float]] = None):
        self._models: dict[str, ModelState] = {}
        self._runs: dict[str, JobRun] = {}  # run_id → job
        self._ended_runs: set[str] = set()  # attempts whose job ended: their rows are refused
        self._weights = dict(account_weights or {})
        self._tokens = itertools.count()
        self._json: dict[str, JobTicket | PoolModel] = {}  # what `submit` was sent → parsed
        self._watcher: Optional[asyncio.Task] = None
        self.lifecycle = ReplicaLifecycle(self._models, on_ready=self._dispatch)

    # -------------------------------------------------------------- for jobs

    async def submit(self, ticket: JobTicket | str, model: PoolModel | str, rows: list[tuple[str, int, str]]) -> list[Answer]:
        """Answer rows (shard, line, EngineRequest JSON) of one job, in order. Returns
        when every one is answered; raises EngineStartError when the model's engine
        cannot start. A job's engine stage sends the ticket and the model as JSON, which
        is parsed once per job here: as objects, Ray would pickle them on every batch."""
        ticket, model = self._parsed(JobTicket, ticket), self._parsed(PoolModel, model)
        if ticket.run_id in self._ended_runs:
            # Its job was cancelled, expired or re-queued while its driver still runs:
            # nothing more of this attempt reaches an engine.
            raise asyncio.CancelledError(f"job {ticket.job} has ended")
        job = await self._register(ticket, model)
        state = self._models[job.model]
        leading = not job.lead_sent
        if leading:
            job.lead_sent = True
            # Only an idle replica answers a lone batch fast: on a busy or starting one,
            # the job's other batches would be held back for nothing.
            job.lead_holds = self._room_for_a_lead(state)
            if not job.lead_holds:
                self._release_leads(job.model)
        if leading and job.lead_holds:
            # Its other rows come once the lead is answered, or its time is up: until
            # then they count as arriving, or a job of another account started at the
            # same moment would take every slot and this one wait a whole wave
            # (measured: 48 % done when the other completed).
            until = job.registered + state.policy.lead_batch_seconds
            state.arriving[ticket.account] = max(until, state.arriving.get(ticket.account, 0.0))
            asyncio.get_running_loop().call_later(max(0.0, until - time.monotonic()), job.lead_answered.set)
        else:
            if job.lead_holds:
                await self._behind_the_lead(job)
            state.arriving.pop(ticket.account, None)  # its rows are here
        loop = asyncio.get_running_loop()
        pending = []
        for shard, line, request_json in rows:
            row = Row(ticket.run_id, (shard, line), request_json, loop.create_future(), account=ticket.account)
            pending.append(row.answer)
            enqueue(state, job, row)
        self._ensure_watcher()
        self.lifecycle.scale(state)
        self._dispatch_soon(state)
        if leading:  # a job shorter than the watcher's interval still gets its series
            metrics.report_pool(self._models.values(), self._runs)
        try:
            return list(await asyncio.gather(*pending))
        finally:
            if leading:
                job.lead_answered.set()
                if job.lead_holds:
                    # Its held rows go now and fill the engine: a lead of another job
                    # beside them no longer decodes fast, so its rows go too.
                    self._release_leads(job.model)
                    if not job.held:  # nothing more of it is coming
                        state.arriving.pop(ticket.account, None)

    def _parsed(self, kind, value):
        if not isinstance(value, str):
            return value
        parsed = self._json.get(value)
        if parsed is None:
            if len(self._json) >= MAX_PARSED:
                self._json.clear()
            parsed = self._json[value] = kind.model_validate_json(value)
        return parsed

    def _room_for_a_lead(self, state: ModelState) -> bool:
        """Nothing queued, and a ready replica runs nothing but lead batches still
        holding their jobs' other rows: a lead sent there decodes beside a few dozen rows,
        in seconds. So jobs created together each get their first rows fast (measured:
        4.2 and 4.7 s after create; with the first job's rows released when the second
        came, both first rows came with the first whole wave, 14 s)."""
        if len(state.queue):
            return False
        leading = {run_id for run_id, job in self._runs.items() if job.lead_holds and not job.lead_answered.is_set()}
        return any(replica.state == "ready" and all(entry.row.run_id in leading for entry in replica.in_flight.values())
                   for replica in state.replicas)

    def _release_leads(self, model: str) -> None:
        """The leads of this model are no longer alone on their replicas (a new job's
        rows go without holding, or an answered lead's held rows fill the engine), so
        every job's held rows go now. Held until their own lead was answered, a whole
        wave with the others' rows beside it, they started up to lead_batch_seconds
        after the others', and those jobs kept the lead of every wave (measured: 5 s
        behind, 52 % done when the other account's job completed)."""
        for other in self._runs.values():
            if other.model == model and other.lead_holds:
                other.lead_answered.set()

    async def _behind_the_lead(self, job: JobRun) -> None:
        """Hold a batch until the job's first one is answered, at most the policy's
        lead_batch_seconds from the job's first call (one timer, set with the lead,
        releases every held batch at once): alone on an idle replica that batch decodes
        fast, where with all of the job's rows beside it, it would come back with the
        first wave (docs/engines.md, "A job's first results")."""
        job.held += 1
        try:
            await job.lead_answered.wait()
        finally:
            job.held -= 1
        if job.ticket.run_id in self._ended_runs:
            raise asyncio.CancelledError(f"job {job.ticket.job} has ended")

    async def warm(self, model: PoolModel) -> None:
        """Start a replica of this model now if it has none (a job is being validated)."""
        state = self._model(model)
        self._ensure_watcher()
        if not state.live():
            self.lifecycle.start(state)

    async def expect(self, model: PoolModel, account: str, seconds: float = ARRIVAL_SECONDS) -> None:
        """A job of `account` on this model was just started (its driver is starting):
        until its rows come, at most `seconds`, the accounts already sending keep to
        their fair share of the slots, so that its rows find slots free."""
        self._model(model).arriving[account] = time.monotonic() + seconds

    async def end_job(self, job: str, run_id: Optional[str] = None) -> int:
        """Drop every queued row of a job (all its attempts, or only `run_id`) and abort
        its rows inside the engines. The job's own engine stage gets nothing back for
        them; its driver is being stopped or has ended. Returns how many rows were
        dropped or aborted."""
        runs = {run for run, known in self._runs.items() if known.ticket.job == job and run_id in (None, run)}
        dropped = 0
        for state in self._models.values():
            dropped += drop_runs(state, runs)
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
                self.lifecycle.stop(state, replica)

    # ------------------------------------------------------------------ rows

    async def _register(self, ticket: JobTicket, model: PoolModel) -> JobRun:
        job = self._runs.get(ticket.run_id)
        if job is None:
            # The job's failure records: rows that failed replicas before this attempt.
            failures = await asyncio.to_thread(FailureLog, ticket.job)
            job = self._runs.setdefault(ticket.run_id, JobRun(ticket, self._model(model).pool_model.spec.key, failures))
        self._models[job.model].served_names.add(model.served_name)
        return job

    def _model(self, model: PoolModel) -> ModelState:
        key = model.spec.key
        state = self._models.get(key)
        if state is None:
            state = self._models[key] = ModelState(model)
        else:
            state.pool_model = model  # the latest settings win (a changed catalog)
        for account, weight in self._weights.items():
            state.queue.set_weight(account, weight)
        return state

    def _dispatch_soon(self, state: ModelState) -> None:
        """One dispatch pass at the loop's next turn, for every batch that arrived
        meanwhile: a job's held batches, released together, are all queued before any
        is dispatched. Dispatched one by one, the first would find its account's queue
        nearly empty and give the slots to another account's queued rows (measured:
        a job's released rows got 16 slots of 160, the other account's 128)."""
        if state.dispatch_pending:
            return
        state.dispatch_pending = True

        def dispatch_now() -> None:
            state.dispatch_pending = False
            self._dispatch(state)

        asyncio.get_running_loop().call_soon(dispatch_now)

    def _dispatch(self, state: ModelState) -> None:
        batches: dict[ReplicaState, list[tuple[int, str]]] = {}

        def send(replica: ReplicaState, row: Row) -> None:
            token = next(self._tokens)
            replica.in_flight[token] = InFlight(row, time.monotonic())
            state.sent(row)
            batches.setdefault(replica, []).append((token, row.request_json))

        dispatch(state, send)
        for replica, batch in batches.items():
            asyncio.ensure_future(quietly(replica.actor.submit.remote(batch)))
            if replica.collector is None:
                replica.collector = asyncio.ensure_future(self._collect(state, replica))

    async def _collect(self, state: ModelState, replica: ReplicaState) -> None:
        """Take a replica's answers as they finish, for as long as it serves."""
        while replica in state.replicas:
            try:
                answers = await replica.actor.collect.remote()
            except ray.exceptions.RayTaskError as error:
                cause = error.cause if isinstance(error.cause, Exception) else error
                reason = str(cause) if isinstance(cause, EngineFailure) else f"{type(cause).__name__}: {cause}"
                self._replica_failed(state, replica, reason)
                return
            except ray.exceptions.RayActorError as error:
                self._replica_failed(state, replica, f"engine replica died: {str(error).splitlines()[0]}")
                return
            for token, answer in answers:
                entry = state.take(replica, token)
                if entry is None:
                    continue  # its job ended meanwhile
                if not entry.row.answer.done():
                    entry.row.answer.set_result(answer)
            if not replica.in_flight:
                replica.idle_since = time.time()
            self._dispatch(state)

    # -------------------------------------------------------------- failures

    def _replica_failed(self, state: ModelState, replica: ReplicaState, reason: str) -> None:
        """A replica died or hung: stop it, and send each row it had again, of every
        job. Rows that were in flight become suspects (they run alone from now on); a
        suspect that failed alone too often becomes an engine_error row."""
        if replica not in state.replicas:
            return  # already handled (every call in flight on it fails the same way)
        runs = {entry.row.run_id for entry in replica.in_flight.values()} & self._runs.keys()
        log_replica("failed", state, replica, logging.ERROR, reason=reason,
                    jobs=sorted(self._runs[run].ticket.job_id for run in runs))
        entries = list(replica.in_flight.values())
        replica.in_flight.clear()
        for entry in entries:
            state.left(entry.row)
        self.lifecycle.stop(state, replica)
        alone = len(entries) == 1
        by_run: dict[str, list[Row]] = {}
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
                    enqueue(state, job, row, front=True)
            answer_if_spent(state, job)
        self.lifecycle.scale(state)
        self._dispatch(state)

    @staticmethod
    async def _write_failure(job: JobRun, record) -> None:
        try:
            await asyncio.to_thread(job.failures.write, record)
        except Exception as error:  # the rows are retried either way
            logger.error("could not record an engine failure for %s: %s: %s", job.ticket.job, type(error).__name__, error)

    def _ensure_watcher(self) -> None:
        if self._watcher is None or self._watcher.done():
            self._watcher = asyncio.ensure_future(self._watch())

    async def _watch(self) -> None:
        """The watchdogs (requests, starts) and the scaler, twice a second."""
        while True:
            await asyncio.sleep(WATCH_INTERVAL_SECONDS)
            for key, state in list(self._models.items()):
                try:
                    self._check_hangs(state)
                    self.lifecycle.check_starts(state)
                    self.lifecycle.scale(state)
                    self._dispatch(state)
                except Exception:  # the watcher must outlive any one bad pass
                    logger.exception("engine pool pass failed for %s", key)
            metrics.report_pool(self._models.values(), self._runs)

    def _check_hangs(self, state: ModelState) -> None:
        timeout = state.policy.request_timeout_seconds
        now = time.monotonic()
        for replica in list(state.replicas):
            stuck = [e for e in replica.in_flight.values() if now - e.since > timeout]
            if stuck:
                custom_id = json.loads(stuck[0].row.request_json).get("custom_id")
                self._replica_failed(state, replica, f"request {custom_id!r} ran over {timeout:g}s: engine hung")

