"""Reaching the pool actor: its name per storage root and its handle, created on first
use. The API, the scheduler, `raybatch run` and each job's engine stage go through here."""

from __future__ import annotations

import hashlib
from typing import Any, Optional

import ray

from raybatch.engines.pool import EnginePool

NAMESPACE = "raybatch"  # of every named actor of the service: the pool and the scheduler


def pool_name(storage: str) -> str:
    """One pool per storage root, like the scheduler: two services never share one."""
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
