"""`EngineReplica`: one engine for one (model, precision, engine arguments), as a Ray
actor on its GPUs. The pool sends it rows in batches (`submit`) and takes back whatever
has finished (`collect`, a long poll), so a finished row frees its slot at once without
one Ray call per row, which capped the pool at about 600 rows/s. The pool
(`engines/pool.py`) owns every replica: it decides where they run, what they get and
when they go.

`ReplicaSpec` is what makes two replicas interchangeable: the same spec, the same
answers. Jobs whose specs are equal share replicas; a BF16 and an FP8 job on one model
have different specs.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from typing import Any, Optional

from pydantic import BaseModel, ConfigDict

from raybatch.exceptions import RowError
from raybatch.pipeline.rows import EngineRequest
from raybatch.protocol import CamelModel

# (kind, result JSON, error code, error message): the engine stage's answer for a row.
Answer = tuple[Optional[str], Optional[str], Optional[str], Optional[str]]


class ReplicaSpec(BaseModel):
    """What a replica runs and what it needs from the cluster."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: str  # "vllm" | "scripted"
    model: str  # the source: a Hugging Face ID or a path every node can read
    engine_args: dict[str, Any]
    cpu_kv_cache_gib: int = 1
    gpus: int = 0  # tensor_parallel_size x pipeline_parallel_size
    pipeline_parallel_size: int = 1
    accelerator_types: list[str] = []  # GPU types that can serve it (empty: any)
    cpus: float = 1.0  # reserved for the engine's own loop, so pipeline tasks cannot starve it
    resources: dict[str, float] = {}

    @property
    def key(self) -> str:
        """Replicas of equal keys are interchangeable (placement aside)."""
        identity = self.model_dump_json(include={"kind", "model", "engine_args", "cpu_kv_cache_gib"})
        return hashlib.sha256(identity.encode()).hexdigest()[:16]


class ReplicaPlacement(BaseModel):
    """Where one replica goes: Ray actor options, or a placement group for replicas
    whose pipeline stages may span nodes."""

    num_cpus: float
    num_gpus: float
    accelerator_type: Optional[str] = None
    resources: dict[str, float] = {}
    bundles: Optional[list[dict[str, float]]] = None  # placement group, when pipeline parallel
    strategy: Optional[str] = None


def placement(spec: ReplicaSpec, accelerator_type: Optional[str]) -> ReplicaPlacement:
    """Pure: how a replica of `spec` is placed. Tensor parallel stays inside one node
    (the actor holds all its GPUs; vLLM's workers are its own processes). Pipeline
    parallel takes a placement group of one GPU per worker, packed node by node, and
    vLLM's Ray executor puts its workers in it; the actor itself needs only CPU."""
    if spec.pipeline_parallel_size > 1:
        gpu = {"GPU": 1.0, **({f"accelerator_type:{accelerator_type}": 0.001} if accelerator_type else {})}
        return ReplicaPlacement(
            num_cpus=spec.cpus,
            num_gpus=0,
            resources=spec.resources,
            bundles=[{"CPU": spec.cpus, **spec.resources}] + [dict(gpu) for _ in range(spec.gpus)],
            strategy="PACK",
        )
    return ReplicaPlacement(
        num_cpus=spec.cpus, num_gpus=spec.gpus, accelerator_type=accelerator_type, resources=spec.resources
    )


class ReplicaInfo(CamelModel):
    """One replica as `raybatch engines` and the admin route show it."""

    replica_id: str
    model: str  # the served names of the jobs that used it, else the source
    precision_key: str  # the spec's key: replicas of equal keys are interchangeable
    node: Optional[str]
    gpus: int
    accelerator_type: Optional[str]
    state: str  # starting | ready | draining (taking no new rows: a suspect row waits for it)
    rows_in_flight: int
    rows_queued: int  # rows waiting for this model, all replicas together
    idle_since: Optional[float]  # unix time; None while it has rows


class EngineReplica:
    """The actor. Built by the pool with `ray.remote(EngineReplica).options(...)`."""

    def __init__(self, spec: ReplicaSpec, engine: Any = None):
        if engine is None:
            from raybatch.engines.vllm_engine import build_engine

            engine = build_engine(spec.kind, spec.model, spec.engine_args, spec.cpu_kv_cache_gib)
            _reap_children_when_gone()
        self._engine = engine
        self._running: dict[int, asyncio.Task] = {}  # the pool's token → the row's request
        self._answered: list[tuple[int, Answer]] = []  # finished, not yet collected
        self._failure: Optional[BaseException] = None
        self._news: Optional[asyncio.Event] = None  # made on the actor's own loop

    def ready(self) -> dict:
        import ray

        return {"node": ray.get_runtime_context().get_node_id(), "pid": os.getpid()}

    async def generate(self, request_json: str) -> Answer:
        """One row. A RowError is the row's answer; EngineFailure (or anything else)
        leaves this call: the engine is in trouble."""
        request = EngineRequest.model_validate_json(request_json)
        try:
            result = await self._engine.generate(request)
        except RowError as error:
            return request.kind, None, error.code, error.message
        return request.kind, result.model_dump_json(), None, None

    async def submit(self, rows: list[tuple[int, str]]) -> None:
        """Start rows (the pool's token, EngineRequest JSON) at once; their answers come
        back through `collect`."""
        for token, request_json in rows:
            self._running[token] = asyncio.ensure_future(self._run(token, request_json))

    async def collect(self) -> list[tuple[int, Answer]]:
        """The answers finished since the last call, waiting for at least one. After a
        row's engine failure, the answers finished before it, then the failure itself
        (raised: the pool gives up on this replica and sends its rows elsewhere)."""
        news = self._event()
        while not self._answered and self._failure is None:
            news.clear()
            await news.wait()
        if not self._answered:
            raise self._failure
        answered, self._answered = self._answered, []
        return answered

    async def abort(self, tokens: list[int]) -> None:
        """Abort these rows inside the engine (their job ended); they are never answered."""
        for token in tokens:
            task = self._running.pop(token, None)
            if task is not None:
                task.cancel()

    async def _run(self, token: int, request_json: str) -> None:
        try:
            answer = await self.generate(request_json)
        except asyncio.CancelledError:
            return  # aborted
        except Exception as error:  # any failure but a row's own (RowError) is the engine's
            self._failure = self._failure or error
        else:
            self._answered.append((token, answer))
        finally:
            self._running.pop(token, None)
            self._event().set()

    def _event(self) -> asyncio.Event:
        if self._news is None:
            self._news = asyncio.Event()
        return self._news


# Run beside a replica: waits until the replica's process is gone (this process is then
# re-parented), and kills the engine processes it had started.
_REAPER = """
import os, signal, sys, time
parent, pids = int(sys.argv[1]), [int(pid) for pid in sys.argv[2:]]
while os.getppid() == parent:
    time.sleep(1)
for pid in pids:
    try:
        os.kill(pid, signal.SIGKILL)
    except OSError:
        pass
"""


def _reap_children_when_gone() -> None:
    """vLLM runs its engine core (and workers) in child processes that outlive a
    replica killed with SIGKILL (`ray.kill`, `ray stop --force`, a lost raylet): each
    would keep its memory, and on a GPU its GPU memory, for good. A small reaper process
    kills them once the replica's process is gone."""
    import subprocess
    import sys

    import psutil

    children = [str(child.pid) for child in psutil.Process().children(recursive=True)]
    if children:
        subprocess.Popen([sys.executable, "-c", _REAPER, str(os.getpid()), *children],
                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
