"""What the engine pool knows: its settings per model (`PoolPolicy`, made from a job's
`EngineConfig` by `pool_model_for`), who sends rows (`JobTicket`), and its bookkeeping
of every row and replica (`ModelState` and the records inside it). Data only; the pool
(`engines/pool.py`), its dispatch (`engines/dispatch.py`) and its replica lifecycle
(`engines/lifecycle.py`) act on it.
"""

from __future__ import annotations

import asyncio
import json
import math
from collections import Counter, OrderedDict
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional

from pydantic import BaseModel, ConfigDict

from raybatch.engines.failures import FailureLog, RowKey
from raybatch.engines.fair_queue import FairQueue
from raybatch.engines.replica import ReplicaSpec
from raybatch.pipeline.rows import prompt_prefix

if TYPE_CHECKING:
    from raybatch.config import EngineConfig
    from raybatch.precision import EnginePlan


class PoolPolicy(BaseModel):
    """How the pool runs one model's replicas (from the job's EngineConfig)."""

    model_config = ConfigDict(extra="forbid")

    min_replicas: int = 0
    max_replicas: int = 1
    idle_seconds: float = 300
    slots_per_replica: int = 320  # admission_factor x max_num_seqs
    # The rows an engine runs at once (max_num_seqs); the rest of its slots wait in the
    # engine's own queue, first come first served. None: the same as the slots.
    running_per_replica: Optional[int] = None
    prefix_affinity: bool = True
    lead_batch_seconds: float = 5
    request_timeout_seconds: float = 600
    max_failures_per_row: int = 2
    max_engine_failures_per_job: int = 5
    max_start_failures: int = 3
    start_timeout_seconds: float = 600


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
    job_id: str = ""  # the service's job id, for metrics; "" for `raybatch run`


@dataclass(eq=False)
class Row:
    run_id: str
    key: RowKey
    request_json: str
    answer: asyncio.Future
    suspect: bool = False
    account: str = ""
    _prefix: Optional[str] = None

    def kind(self) -> Optional[str]:
        return json.loads(self.request_json).get("kind")

    @property
    def prefix(self) -> str:
        """The start of its prompt (parsed when first asked: only a model with several
        replicas to choose from asks)."""
        if self._prefix is None:
            self._prefix = prompt_prefix(self.request_json)
        return self._prefix


@dataclass(eq=False)
class InFlight:
    row: Row
    since: float  # when the replica got it: the hang watchdog counts from here


@dataclass(eq=False)
class ReplicaState:
    replica_id: str
    actor: Any
    accelerator_type: Optional[str]
    placement_group: Any = None
    state: str = "starting"  # starting | ready | draining
    node: Optional[str] = None
    in_flight: dict[int, InFlight] = field(default_factory=dict)
    idle_since: float = field(default_factory=time.time)
    asked_at: float = field(default_factory=time.monotonic)  # the start timeout counts from here
    running_suspect: bool = False  # a suspect row runs here alone
    held_for_suspect: bool = False  # takes no new rows: a suspect waits for it to drain
    collector: Any = None  # the pool's task taking its answers (`EnginePool._collect`)

    @property
    def idle(self) -> bool:
        """Ready, with no row in its engine."""
        return self.state == "ready" and not self.in_flight


@dataclass(eq=False)
class ModelState:
    pool_model: PoolModel
    queue: FairQueue = field(default_factory=FairQueue)
    suspects: list[Row] = field(default_factory=list)  # each runs alone on a replica
    replicas: list[ReplicaState] = field(default_factory=list)
    start_failures: int = 0
    served_names: set[str] = field(default_factory=set)
    # Accounts whose job the scheduler has just started, until their rows arrive or the
    # time (monotonic) runs out: the accounts already sending keep to their fair share
    # of the slots meanwhile (dispatch.share_caps).
    arriving: dict[str, float] = field(default_factory=dict)
    # Rows in flight per account, kept as rows enter and leave replicas (`sent`,
    # `left`): counting them on every dispatch would cost O(rows in flight) per answer.
    account_in_flight: Counter = field(default_factory=Counter)
    # Prompt prefix → the replica its last row went to (most recent last, bounded):
    # that replica's prefix cache holds it (dispatch.replica_for).
    prefix_homes: "OrderedDict[str, ReplicaState]" = field(default_factory=OrderedDict)
    dispatch_pending: bool = False  # a pass is scheduled for the loop's next turn (`_dispatch_soon`)

    @property
    def policy(self) -> PoolPolicy:
        return self.pool_model.policy

    def live(self) -> list[ReplicaState]:
        return [r for r in self.replicas if r.state in ("starting", "ready")]

    def in_flight(self) -> int:
        return sum(len(r.in_flight) for r in self.replicas)

    def sent(self, row: "Row") -> None:
        self.account_in_flight[row.account] += 1

    def take(self, replica: ReplicaState, token: int) -> Optional[InFlight]:
        """A row leaves a replica (answered or aborted): its slot, its account's count and
        the replica's suspect slot free. None when it had left already."""
        entry = replica.in_flight.pop(token, None)
        if entry is not None:
            self.left(entry.row)
            if entry.row.suspect:
                replica.running_suspect = False
        return entry

    def left(self, row: "Row") -> None:
        self.account_in_flight[row.account] -= 1
        if self.account_in_flight[row.account] <= 0:
            del self.account_in_flight[row.account]


@dataclass(eq=False)
class JobRun:
    """One attempt of a job, as the pool knows it."""

    ticket: JobTicket
    model: str  # key into the pool's models
    failures: FailureLog
    # Its first batch goes ahead; when a replica was idle for it, the others wait (at
    # most the policy's lead_batch_seconds from `registered`) until it is answered.
    registered: float = field(default_factory=time.monotonic)
    lead_sent: bool = False
    lead_holds: bool = False
    lead_answered: asyncio.Event = field(default_factory=asyncio.Event)
    held: int = 0  # its batches waiting behind the lead


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
        running_per_replica=max_num_seqs,
        prefix_affinity=engine.prefix_affinity,
        lead_batch_seconds=engine.lead_batch_seconds,
        request_timeout_seconds=engine.request_timeout_seconds,
        max_failures_per_row=engine.max_failures_per_row,
        max_engine_failures_per_job=engine.max_engine_failures_per_job,
        max_start_failures=engine.max_start_failures,
        start_timeout_seconds=engine.start_timeout_seconds,
    )
    return PoolModel(spec=spec, policy=policy, served_name=served_name)
