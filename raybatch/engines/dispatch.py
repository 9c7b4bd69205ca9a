"""Which row goes where, for one model's rows and replicas (`ModelState`): rows wait in
the model's `FairQueue` (or, once they were in flight at an engine failure, among its
suspects), and whenever a replica has a free slot the next row by fair share goes to
it. Sending is the caller's (`send`, a Ray call in the pool), so everything here is
plain bookkeeping, unit-tested with fake replicas.
"""

from __future__ import annotations

import asyncio
import time
from typing import Callable, Iterable

import ray

from raybatch.engines.failures import budget_message, poison_message
from raybatch.engines.pool_state import JobRun, ModelState, ReplicaState, Row
from raybatch.exceptions import EngineStartError
from raybatch.protocol import ErrorCode

Send = Callable[[ReplicaState, Row], None]


def enqueue(state: ModelState, job: JobRun, row: Row, front: bool = False) -> None:
    """Queue a row, or answer it engine_error at once when its job has spent its engine
    failures or the row failed engines alone too often. A suspect waits apart: it will
    run alone on a replica."""
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


def dispatch(state: ModelState, send: Send) -> None:
    """Fill every free slot: suspects first, each alone on a replica; then rows by
    fair share, each to the least busy replica or its prefix's (`replica_for`)."""
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
        send(replica, row)
    open_replicas = [r for r in ready if not r.running_suspect and not r.held_for_suspect]
    policy = state.policy
    slots = policy.slots_per_replica
    in_flight = state.account_in_flight
    # Shares of what the engines run at once first, then of the slots: an engine runs
    # its first max_num_seqs rows and queues the rest by arrival, so the account that
    # sent first would hold more of the running rows than its share of the slots says,
    # a lead that lasts every wave. Each level is (shares, whether any is arriving).
    levels = [share_caps(state, slots * len(open_replicas))]
    if policy.running_per_replica is not None and policy.running_per_replica < slots:
        levels.insert(0, share_caps(state, policy.running_per_replica * len(open_replicas)))
    while len(state.queue):
        free = [r for r in open_replicas if len(r.in_flight) < slots]
        if not free:
            break
        # An account at its share waits while another below its share has rows queued;
        # when none has, the slot is not left idle, unless it is kept for a job that is
        # arriving.
        popped = None
        for shares, arriving in levels:
            popped = state.queue.pop(skip={a for a, share in shares.items() if in_flight[a] >= share})
            if popped is not None or arriving:
                break
        if popped is None:
            if arriving:
                break
            popped = state.queue.pop()
        account, _, row = popped
        if not row.answer.done():
            send(replica_for(state, row, free), row)  # counts it in state.account_in_flight


# Prefixes remembered per model: enough for every distinct prefix of many jobs' windows.
MAX_PREFIX_HOMES = 16384


def replica_for(state: ModelState, row: Row, free: list[ReplicaState]) -> ReplicaState:
    """Where a row goes, among replicas with a free slot: the least busy, unless its
    prompt's start went to another replica before and that one is not much busier
    (within a quarter of the admission window). There, the engine's prefix cache holds
    the shared start; on the least busy replica it would be computed again."""
    least = min(free, key=lambda r: len(r.in_flight))
    if len(free) == 1 or not state.policy.prefix_affinity:
        return least
    homes = state.prefix_homes
    home = homes.get(row.prefix)
    slack = max(1, state.policy.slots_per_replica // 4)
    chosen = home if any(home is r for r in free) and len(home.in_flight) - len(least.in_flight) < slack else least
    homes[row.prefix] = chosen
    homes.move_to_end(row.prefix)
    if len(homes) > MAX_PREFIX_HOMES:
        homes.popitem(last=False)
    return chosen


def share_caps(state: ModelState, slots: int) -> tuple[dict[str, int], bool]:
    """Each account's weighted share of the slots, over the accounts with rows queued or
    in flight and those arriving (a job the scheduler has started whose rows are not here
    yet, or whose rows wait behind its lead batch); and whether any is arriving. Rows in
    an engine are never taken back, so
    without shares in flight the first job to send would fill every slot and a job
    started at the same moment would wait a whole wave of generation; queue order alone
    (the fair queue) only decides which of the waiting rows goes next."""
    now = time.monotonic()
    state.arriving = {a: until for a, until in state.arriving.items() if until > now}
    sending = state.queue.accounts() | set(state.account_in_flight)  # `left` drops zeros
    everyone = sending | set(state.arriving)
    if len(everyone) < 2:
        return {}, False
    total = sum(state.queue.weight(a) for a in everyone)
    return {a: max(1, int(slots * state.queue.weight(a) / total)) for a in sending}, bool(state.arriving)


def drop_runs(state: ModelState, runs: set[str]) -> int:
    """Drop every queued row of these job attempts and abort their rows inside the
    engines. Returns how many rows were dropped or aborted."""
    rows = _take_waiting(state, runs)
    for row in rows:
        row.answer.cancel()
    dropped = len(rows)
    for replica in state.replicas:
        aborted = [token for token, entry in replica.in_flight.items() if entry.row.run_id in runs]
        for token in aborted:
            state.take(replica, token).row.answer.cancel()
        if aborted:  # aborts the requests inside the engine
            asyncio.ensure_future(quietly(replica.actor.abort.remote(aborted)))
        dropped += len(aborted)
    return dropped


def answer_if_spent(state: ModelState, job: JobRun) -> None:
    """A job that has caused its limit of engine failures sends nothing more: its
    queued rows are answered engine_error now (rows in flight elsewhere finish)."""
    spent = budget_message(job.failures, state.policy.max_engine_failures_per_job)
    if not spent:
        return
    run_id = job.ticket.run_id
    _answer(_take_waiting(state, {run_id}), lambda row: row.answer.set_result(
        (row.kind(), None, ErrorCode.ENGINE_ERROR.value, spent)))


def fail_waiting(state: ModelState, message: str) -> None:
    """The model's engine cannot start: every row waiting for it fails its job."""
    runs = {row.run_id for row in list(state.queue) + state.suspects}
    _answer(_take_waiting(state, runs), lambda row: row.answer.set_exception(EngineStartError(message)))


def _take_waiting(state: ModelState, runs: set[str]) -> list[Row]:
    """Remove these attempts' queued rows and suspects; the rows removed."""
    rows = [row for run in runs for row in state.queue.remove_job(run)]
    rows += [row for row in state.suspects if row.run_id in runs]
    state.suspects = [row for row in state.suspects if row.run_id not in runs]
    return rows


def _answer(rows: Iterable[Row], answer: Callable[[Row], None]) -> None:
    for row in rows:
        if not row.answer.done():
            answer(row)


async def quietly(call) -> None:
    """Await a replica call whose failure the pool learns from its `collect` anyway (a
    dead replica's fails too), so that Ray does not log it as an unhandled error."""
    try:
        await call
    except (ray.exceptions.RayError, asyncio.CancelledError):
        pass
