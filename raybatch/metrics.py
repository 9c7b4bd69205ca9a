"""raybatch's Prometheus metrics, through Ray's metrics (`ray.util.metrics`).

Every process that records one exports it through its node's Ray metrics agent
(`ray start --metrics-export-port`; `raybatch up --metrics-port`). Ray adds `ray_` to
each name and `_total` to counters: `raybatch_rows_processed` is scraped as
`ray_raybatch_rows_processed_total`. docs/deploy.md lists them with their labels, and
cluster/grafana-dashboard.json queries them.

Where each is recorded, and why there:
- the writer (`pipeline/write.py`) counts rows, tokens and bytes as it commits them, so
  a row counts once, when it is in a committed part, whatever attempt wrote it;
- the scheduler counts jobs by state and the time to a job's first row;
- the engine pool reports its replicas, queues and rows in flight;
- the API counts requests by route (the route's template, never the raw path).

Labels stay few: per job (`job_id`) only on rows processed, failed and in flight, as
the issue asks; everything else is per account, model or route. A job's series stay
after it ends (Ray cannot drop a label set), at their last value (0 for gauges).
"""

from __future__ import annotations

import json
import logging
from collections import Counter as Tally
from datetime import datetime
from functools import cache
from typing import Any, Iterable, Optional

from ray.util.metrics import Counter, Gauge, Histogram

logger = logging.getLogger(__name__)

JOB = ("job_id", "account")
SECONDS_TO_FIRST_ROW = [1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1800, 3600]
COMMIT_SECONDS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30]


@cache
def _metrics() -> dict[str, Any]:
    """Made on first use, once per process: most processes that import raybatch record
    none of them."""
    return {
        "jobs": Gauge("raybatch_jobs", "Jobs in each state that has not ended.", ("state",)),
        "job_state_changes": Counter("raybatch_job_state_changes", "Jobs that entered each state "
                                     "(the ended states' counts are here).", ("state",)),
        "rows_processed": Counter("raybatch_rows_processed", "Input lines committed to the "
                                  "output, answered or as error rows.", JOB),
        "rows_failed": Counter("raybatch_rows_failed", "Error rows committed, by error code.", (*JOB, "code")),
        "rows_in_flight": Gauge("raybatch_rows_in_flight", "Rows inside engine replicas.", (*JOB, "model")),
        "input_tokens": Counter("raybatch_input_tokens", "Prompt tokens of committed rows.", ("account",)),
        "output_tokens": Counter("raybatch_output_tokens", "Generated tokens of committed rows.", ("account",)),
        "cached_tokens": Counter("raybatch_cached_tokens", "Prompt tokens served from the prefix "
                                 "cache, of committed rows.", ("account",)),
        "engine_replicas": Gauge("raybatch_engine_replicas", "Engine replicas.", ("model", "precision", "state")),
        "queue_depth": Gauge("raybatch_queue_depth", "Rows waiting in the engine pool for a replica.", ("model",)),
        "time_to_first_row": Histogram("raybatch_time_to_first_row_seconds", "From a job's first RUNNING "
                                       "to its first committed row.", SECONDS_TO_FIRST_ROW),
        "commit_latency": Histogram("raybatch_commit_latency_seconds", "Writing one part and its "
                                    "commit record.", COMMIT_SECONDS),
        "committed_bytes": Counter("raybatch_committed_bytes", "Output bytes committed.", ("account",)),
        "api_requests": Counter("raybatch_api_requests", "API requests answered.", ("route", "method", "status")),
    }


def metric(name: str):
    return _metrics()[name]


class GaugeSet:
    """A gauge whose label sets are all published together: one that is missing from the
    next publish drops to 0, so a job that ended or a replica that stopped does not keep
    its last value."""

    def __init__(self, name: str):
        self._name = name
        self._last: set[tuple[tuple[str, str], ...]] = set()

    def publish(self, values: dict[tuple[tuple[str, str], ...], float]) -> None:
        gauge = metric(self._name)
        for labels in self._last - values.keys():
            gauge.set(0, tags=dict(labels))
        for labels, value in values.items():
            gauge.set(value, tags=dict(labels))
        self._last = set(values)


def _key(**labels: str) -> tuple[tuple[str, str], ...]:
    return tuple(sorted(labels.items()))


# ------------------------------------------------------------------- the writer

def error_code(line: bytes) -> str:
    """The `error.code` of an error file's line."""
    try:
        return str(json.loads(line)["error"]["code"])
    except (ValueError, KeyError, TypeError):
        return "unknown"


def record_commit(job: dict[str, str], commit, error_lines: Iterable[bytes], seconds: float) -> None:
    """One part committed (`commit`: its PartCommit) by the writer of `job` (JOB labels)."""
    account = {"account": job["account"]}
    metric("commit_latency").observe(seconds)
    if commit.results + commit.errors:
        metric("rows_processed").inc(commit.results + commit.errors, tags=job)
    for code, count in Tally(map(error_code, error_lines)).items():
        metric("rows_failed").inc(count, tags={**job, "code": code})
    for name, value in (("input_tokens", commit.prompt_tokens), ("output_tokens", commit.completion_tokens),
                        ("cached_tokens", commit.cached_tokens), ("committed_bytes", commit.bytes)):
        if value > 0:
            metric(name).inc(value, tags=account)


# ---------------------------------------------------------------- the scheduler

_jobs = GaugeSet("jobs")


def count_jobs(states: Iterable[str]) -> None:
    """The jobs that have not ended, by state (`states`: one entry per job)."""
    _jobs.publish({_key(state=state): count for state, count in Tally(states).items()})


def count_state_change(state: str) -> None:
    metric("job_state_changes").inc(tags={"state": state})


def observe_first_row(running_since: Optional[datetime], commits: list) -> None:
    """A job's first rows are committed: the time from its first RUNNING to its
    earliest commit (`commits`: its PartCommits)."""
    if running_since and commits:
        first = min(c.committed_at for c in commits)
        metric("time_to_first_row").observe(max(0.0, first - running_since.timestamp()))


# -------------------------------------------------------------- the engine pool

def precision_label(engine_args: dict[str, Any]) -> str:
    """What number format a replica serves in: its quantization (with `+fp8-kv` for an
    FP8 KV cache) or dtype. Several of the API's precision names share one replica (the
    FP8 family), so this names what runs, not what a job asked for."""
    label = str(engine_args.get("quantization") or engine_args.get("dtype") or "default")
    return f"{label}+fp8-kv" if engine_args.get("kv_cache_dtype") == "fp8" else label


def _model_label(state) -> str:
    return ", ".join(sorted(state.served_names)) or state.pool_model.served_name


_replicas, _queues, _in_flight = GaugeSet("engine_replicas"), GaugeSet("queue_depth"), GaugeSet("rows_in_flight")


def report_pool(models: Iterable, runs: dict) -> None:
    """The pool's replicas, queues and rows in flight (`models`: its ModelStates,
    `runs`: run_id → JobRun). Called by its watcher, twice a second; never raises, so
    that the watcher (the watchdogs, the scaler) cannot die of it."""
    try:
        _report_pool(models, runs)
    except Exception:
        logger.exception("cannot report the engine pool's metrics")


def _report_pool(models: Iterable, runs: dict) -> None:
    replicas: Tally = Tally()
    queues: dict = {}
    in_flight: Tally = Tally()
    names = {state.pool_model.spec.key: _model_label(state) for state in models}
    # Every attempt the pool knows has its series, at 0 while none of its rows is inside
    # an engine: a short job's series exists even if no report fell while it had rows in.
    for run in runs.values():
        if run.model in names:
            in_flight[_key(**job_labels(run.ticket.job_id, run.ticket.account), model=names[run.model])] += 0
    for state in models:
        model = names[state.pool_model.spec.key]
        precision = precision_label(state.pool_model.spec.engine_args)
        queues[_key(model=model)] = len(state.queue) + len(state.suspects)
        for replica in state.replicas:
            replicas[_key(model=model, precision=precision, state=replica.state)] += 1
            for entry in replica.in_flight.values():
                run = runs.get(entry.row.run_id)
                if run is not None:
                    in_flight[_key(**job_labels(run.ticket.job_id, run.ticket.account), model=model)] += 1
    _replicas.publish(dict(replicas))
    _queues.publish(queues)
    _in_flight.publish(dict(in_flight))


# ---------------------------------------------------------------------- the API

def count_request(route: str, method: str, status: int) -> None:
    metric("api_requests").inc(tags={"route": route, "method": method, "status": str(status)})


def job_labels(job_id: Optional[str], account: str) -> dict[str, str]:
    """JOB labels; `raybatch run` has no job id."""
    return {"job_id": job_id or "raybatch-run", "account": account}
