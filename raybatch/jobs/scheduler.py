"""`JobScheduler`: one detached, named Ray actor that owns every job state change.

The API asks it to create, cancel and delete jobs; a loop in the actor moves jobs
along: VALIDATING (check input, model, precision) → PENDING (wait for a slot) → RUNNING
(the job's pipeline runs as its own Ray Job, `jobs/driver.py`, so an API or scheduler
restart leaves it alone) → WRITING_RESULTS (publish results.jsonl/errors.jsonl, in a
thread of `publishing.Publisher`, so that no other job waits for it) →
COMPLETED; or EXPIRED / CANCELLED with the committed part published, or RE_QUEUEING
when its driver died (it resumes from its committed parts).

This module holds the API requests, the loop, admission and the records. What it
leans on: `creation` checks a new job's fields and claims its output dataset,
`run_config` makes a job's RunConfig, `driver_control` submits, watches and stops
drivers, `spares` keeps drivers started ahead of jobs, `handoff` is what a driver and
the scheduler leave each other (the run config in, a `DriverOutcome` out), and
`raybatch.output_layout` reads the output folder (progress, commit records, publishing).

All state lives in the store: a restarted scheduler reads the jobs back and carries on
from whatever state each is in. Being the only writer of job records (one lock around
each read-modify-write) is what keeps two changes from overwriting each other.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
import uuid
from datetime import datetime, timedelta
from typing import Iterable, Optional

import ray

from raybatch import metrics
from raybatch.config import ServiceConfig
from raybatch.events import log_job_state
from raybatch.exceptions import (
    AlreadyExists,
    ConfigError,
    FailedPrecondition,
    IllegalTransition,
    NotFound,
)
from raybatch.engines.pool_handle import NAMESPACE, pool_handle, pool_name
from raybatch.jobs.driver_control import DriverControl
from raybatch.jobs.creation import claim_output_dataset, job_fields, refuse_second_continuation
from raybatch.jobs.handoff import DriverAssignment, OutcomeState, delete_assignment, read_outcome, write_run_config
from raybatch.jobs.model_access import model_refusal
from raybatch.jobs.run_config import RunConfigBuilder, check_adapter_source, check_model_source
from raybatch.jobs.spares import SpareDrivers
from raybatch.jobs.states import transition
from raybatch.jobs.publishing import Publisher
from raybatch.output_layout import load_commits, progress_of, read_progress
from raybatch.quotas import AccountQuotas
from raybatch.resources import (
    DATASETS,
    JOBS,
    BatchInferenceJob,
    CreateJobRequest,
    DatasetState,
    JobRecord,
    JobState,
    check_id,
    duration_seconds,
    now,
    parse_reference,
    resource_name,
)
from raybatch.storage import Location
from raybatch.store import Store

logger = logging.getLogger(__name__)

MAX_ATTEMPTS = 3  # drivers that die without an answer before the job FAILS
# While a job started in the last seconds has no committed row (first_rows_pending),
# the scheduler copies progress this often instead of every `progress_interval_seconds`:
# one small read per such job, for at most those seconds, and a first row shows at once.
FIRST_ROWS_POLL_SECONDS = 0.5
S = JobState
ACTIVE = (S.RUNNING, S.CANCELLING)  # states in which a driver may be running
# Entering these, a job's rows in the engine pool are dropped: its driver is stopping,
# dead (a new attempt sends its rows again) or done.
RELEASES_ENGINES = frozenset({S.CANCELLING, S.RE_QUEUEING} | {s for s in S if s.terminal})
# How long after its start a job without a committed row has its progress copied every
# FIRST_ROWS_POLL_SECONDS. Past it the job is on a cold engine or stuck.
FIRST_ROWS_SECONDS = 30.0


def first_rows_pending(records: Iterable[JobRecord], at: datetime) -> bool:
    """Whether a job started less than FIRST_ROWS_SECONDS before `at` has committed no
    row yet (a resumed attempt counts from its job's first start)."""
    recent = timedelta(seconds=FIRST_ROWS_SECONDS)
    return any(
        r.job.state == JobState.RUNNING
        and not r.job.job_progress.total_processed_requests
        and r.runtime.running_since is not None
        and at - r.runtime.running_since < recent
        for r in records
    )


class JobScheduler:
    def __init__(self, config: ServiceConfig):
        self._config = config
        self._store = Store(config.storage)
        if self._store.local:
            self._store.signing_key()  # made once here, before any API replica needs it
        self._lock = threading.RLock()
        self._drivers = DriverControl()
        # The engines every job shares; created here so that it exists before any driver.
        self._pool_name = pool_name(config.storage)
        self._pool = pool_handle(self._pool_name, config.account_weights)
        self._configs = RunConfigBuilder(config, self._store, self._pool_name)
        self._quotas = AccountQuotas(self._store, config)
        self._warmed_catalog = False
        self._awaiting_first_rows = False
        self._spares = SpareDrivers(
            self._drivers, self._store.location, self._store.root_url,
            config.spare_drivers, config.spare_driver_idle_seconds,
        )
        self._stop = threading.Event()
        self._publisher = Publisher(self._wake)
        self._loop = threading.Thread(target=self._run_loop, name="scheduler-loop", daemon=True)
        self._loop.start()

    def ready(self) -> bool:
        return True

    # ------------------------------------------------------------ API requests

    def create_job(self, account: str, job_id: Optional[str], request: CreateJobRequest, created_by: str) -> dict:
        job_id = check_id(job_id) if job_id else f"job-{uuid.uuid4().hex[:12]}"
        fields, runtime = job_fields(self._store, self._config, self._configs, account, request)
        with self._lock:
            if self._store.get_job(account, job_id) is not None:
                raise AlreadyExists(f"batch inference job {job_id} already exists")
            if request.continued_from_job_name:
                refuse_second_continuation(self._store, account, fields["continued_from_job_name"])
            # Under the lock: creates of one account cannot slip past a quota together.
            self._quotas.check_new_job(account)
            output_id = claim_output_dataset(self._store, account, job_id, fields.get("output_dataset_id"))
            fields["output_dataset_id"] = resource_name(account, DATASETS, output_id)
            time_now = now()
            job = BatchInferenceJob(
                **fields,
                name=resource_name(account, JOBS, job_id),
                create_time=time_now,
                update_time=time_now,
                created_by=created_by,
                state=S.VALIDATING,
            )
            self._store.put_job(JobRecord(job=job, runtime=runtime), new=True)
        self._wake()
        return job.model_dump(mode="json", by_alias=True, exclude_none=True)

    def cancel_job(self, account: str, job_id: str) -> dict:
        """Ask a job to stop. A job with no driver running is CANCELLED at once; a
        running one goes CANCELLING and the loop stops its driver within seconds."""
        with self._lock:
            record = self._get_visible(account, job_id)
            if record.job.state.terminal:
                raise FailedPrecondition(f"job {job_id} is already {record.job.state.value}")
            if record.job.state in (S.WRITING_RESULTS,):
                raise FailedPrecondition(f"job {job_id} has finished its lines and is publishing them")
            if record.job.state != S.CANCELLING:
                record.runtime.stop_reason = "cancel"
                self._move(record, S.CANCELLING, "cancel requested")
        self._wake()
        return record.job.model_dump(mode="json", by_alias=True, exclude_none=True)

    def delete_job(self, account: str, job_id: str) -> None:
        """Answers at once. An ended job's record goes now; a job still going is hidden
        from the API now, cancelled (unless it is publishing its lines), and its record
        goes when it ends (`_move`). The output dataset stays."""
        with self._lock:
            record = self._get_visible(account, job_id)
            if record.job.state.terminal:
                self._store.delete_job(account, job_id)
                return
            record.runtime.delete_requested = True
            self._store.put_job(record)
            if record.job.state not in (S.WRITING_RESULTS, S.CANCELLING):
                record.runtime.stop_reason = "cancel"
                self._move(record, S.CANCELLING, "deleted: cancelling")
        self._wake()

    # ------------------------------------------------------------------ loop

    def _wake(self) -> None:
        self._woken = True

    def _run_loop(self) -> None:
        while not self._stop.is_set():
            self._woken = False
            try:
                self.tick()
            except Exception:  # the loop must outlive any one bad pass
                logger.exception("scheduler pass failed")
            interval = self._config.progress_interval_seconds
            if self._awaiting_first_rows:  # their first progress is the one a user waits for
                interval = min(interval, FIRST_ROWS_POLL_SECONDS)
            deadline = time.monotonic() + interval
            while time.monotonic() < deadline and not self._woken:
                time.sleep(0.1)

    def tick(self) -> None:
        # Through the index of jobs that have not ended: ended jobs cost nothing here.
        records = sorted(self._store.active_jobs(), key=lambda r: (r.job.create_time, r.job.name))
        metrics.count_jobs(r.job.state.value for r in records if not r.job.state.terminal)
        for record in records:
            try:
                self._advance(record)
            except IllegalTransition:
                pass  # already logged; a concurrent change won
            except Exception as error:
                logger.exception("job %s", record.job.name)
                self._fail(record, f"internal error: {error}")
        if not self._warmed_catalog:
            self._warm_catalog()
        started = self._admit(records)
        self._awaiting_first_rows = bool(started) or first_rows_pending(records, now())
        # A new spare's process start (seconds of CPU) waits until no job runs: see spares.py.
        if not started and not any(r.job.state in ACTIVE for r in records):
            self._spares.keep()

    def _admit(self, records: list[JobRecord]) -> int:
        """Start PENDING jobs up to the limits, taking accounts in turn (each in order of
        creation), so that one account's queue of jobs cannot keep another's waiting.
        Returns how many it started."""
        active = [r for r in self._store.active_jobs() if r.job.state in ACTIVE]
        running = len(active)
        per_account: dict[str, int] = {}
        for record in active:
            per_account[record.runtime.account] = per_account.get(record.runtime.account, 0) + 1
        waiting: dict[str, list[JobRecord]] = {}
        for record in records:
            if record.job.state in (S.PENDING, S.VALIDATING, S.RE_QUEUEING):
                waiting.setdefault(record.runtime.account, []).append(record)
        # Accounts with the fewest running jobs go first.
        turns = sorted(waiting, key=lambda account: per_account.get(account, 0))
        while turns and running < self._config.max_running_jobs:
            for account in list(turns):
                queue = waiting[account]
                started = False
                while queue and not started:
                    fresh = self._reload(queue.pop(0))
                    if fresh.job.state == S.PENDING and per_account.get(account, 0) < self._running_quota(account):
                        self._start_driver(fresh)
                        per_account[account] = per_account.get(account, 0) + 1
                        running += 1
                        started = True
                if not started or not queue or per_account.get(account, 0) >= self._running_quota(account):
                    turns.remove(account)
                if running >= self._config.max_running_jobs:
                    break
        return running - len(active)

    def _running_quota(self, account: str) -> int:
        return self._config.quota(account).max_running_jobs

    def _warm_catalog(self) -> None:
        """Start the catalog's `min_replicas` at service start, not at the first job."""
        from raybatch.runner import cluster_plan, ensure_ray, job_pool_model

        ensure_ray()
        for name in self._config.models:
            try:
                config = self._configs.for_model(name, input="unused", output="unused")
                if config.engine.min_replicas or config.engine.replicas:
                    self._pool.warm.remote(job_pool_model(config, cluster_plan(config), fixed=False))
            except ConfigError as error:  # its jobs will fail VALIDATING with the same message
                logger.error("model %s cannot be served on this cluster: %s", name, error)
        self._warmed_catalog = True

    def _advance(self, record: JobRecord) -> None:
        state = record.job.state
        if state == S.VALIDATING:
            self._validate(record)
        elif state == S.RE_QUEUEING:
            self._move_if(record, S.RE_QUEUEING, S.PENDING, "resuming from committed parts")
        elif state == S.RUNNING:
            self._watch(record)
        elif state == S.CANCELLING:
            self._drivers.stop(record.runtime.driver_id)
            delete_assignment(self._store.location, record.runtime.driver_id)
            self._finish(record, S.CANCELLED, "cancelled; partial results kept")
        elif state == S.WRITING_RESULTS:
            self._finish(record, S.COMPLETED, "")

    def _validate(self, record: JobRecord) -> None:
        job, account = record.job, record.runtime.account
        problem = None
        _, input_id = parse_reference(job.input_dataset_id, DATASETS, account)
        dataset = self._store.get_dataset(account, input_id)
        if dataset is None:
            problem = f"input dataset {job.input_dataset_id} not found"
        elif dataset.state != DatasetState.READY and self._input_validating(account, input_id):
            return  # a job created right after its upload waits for the validation to end
        elif dataset.state != DatasetState.READY:
            problem = (f"input dataset {job.input_dataset_id} is {dataset.state.value}, not READY: validate its "
                       "upload first (a large dataset validates in the background: wait until it is READY)")
        elif int(dataset.size_bytes) > self._config.max_dataset_bytes:
            problem = f"input dataset is {dataset.size_bytes} bytes, over the limit of {self._config.max_dataset_bytes}"
        elif refusal := model_refusal(self._config, account, job.model):
            problem = refusal  # the catalog or allowlist changed since the job was created
        else:
            try:
                from raybatch.runner import cluster_plan, ensure_ray

                ensure_ray()
                from raybatch.runner import job_pool_model

                config = self._configs.for_job(record)
                if config.engine.kind == "vllm":
                    check_model_source(config.model)
                    check_adapter_source(config)
                plan = cluster_plan(config)
                # A cold model's engine starts now, while the job waits for a slot.
                self._pool.warm.remote(job_pool_model(config, plan, fixed=False))
            except ConfigError as error:
                problem = str(error)
        if problem:
            self._fail(record, problem)
        else:
            self._move_if(record, S.VALIDATING, S.PENDING, "")

    def _input_validating(self, account: str, dataset_id: str) -> bool:
        """Whether the dataset's validation is running (its replica's heartbeat is recent)
        or has just ended."""
        from raybatch.api.validation import read_validation

        record = read_validation(self._store, account, dataset_id)
        if record is not None and time.time() - record.heartbeat < self._config.validation_stale_seconds:
            return True
        # It may have ended between the dataset's read and this one: look again next pass.
        dataset = self._store.get_dataset(account, dataset_id)
        return dataset is not None and dataset.state == DatasetState.READY

    # --------------------------------------------------------------- drivers

    def _start_driver(self, record: JobRecord) -> None:
        account, job_id = record.runtime.account, record.job.name.rsplit("/", 1)[-1]
        config = self._configs.for_job(record)
        write_run_config(self._store.location, account, job_id, config)
        self._announce(config)
        attempt = record.runtime.attempts + 1
        # A spare if one is up (its assignment is written first, then the record that
        # names it: see spares.py). Otherwise a driver of its own, submitted after the
        # record names it: one the record does not name never runs.
        spare = self._spares.take(DriverAssignment(account=account, job_id=job_id, attempt=attempt))
        driver_id = spare or f"raybatch-{account}-{job_id}-{attempt}-{uuid.uuid4().hex[:6]}"
        with self._lock:
            record = self._reload(record)
            if record.job.state != S.PENDING:
                delete_assignment(self._store.location, spare)  # that spare exits unused
                return
            record.runtime.attempts = attempt
            record.runtime.driver_id = driver_id
            record.runtime.running_since = record.runtime.running_since or now()
            self._move(record, S.RUNNING, f"attempt {attempt}")
        if not spare:
            self._drivers.submit(driver_id, storage=self._store.root_url, account=account, job_id=job_id, attempt=attempt)

    def _announce(self, config) -> None:
        """Tell the pool this account's rows are coming, so that the jobs already
        sending leave it its share of the slots (engines/dispatch.py, share_caps)."""
        from raybatch.runner import cluster_plan, job_pool_model

        try:
            self._pool.expect.remote(job_pool_model(config, cluster_plan(config), fixed=False), config.account)
        except Exception:  # only fairness is lost: the job starts all the same
            logger.exception("cannot announce job %s to the engine pool", config.output)

    def _watch(self, record: JobRecord) -> None:
        account, job_id = record.runtime.account, record.job.name.rsplit("/", 1)[-1]
        self._publish_progress(record)
        limit = self._time_limit(record)
        if record.runtime.running_since and now() - record.runtime.running_since > limit:
            record.runtime.stop_reason = "expire"
            # Its requests leave the engines now, not once the driver has stopped.
            self._pool.end_job.remote(self._configs.files_url(record.job.output_dataset_id))
            self._drivers.stop(record.runtime.driver_id)
            delete_assignment(self._store.location, record.runtime.driver_id)
            self._finish(record, S.EXPIRED, f"time limit of {limit.total_seconds():g}s reached; partial results kept")
            return
        # The outcome is the driver's last act, written once everything is committed:
        # the job moves on without waiting for the process to exit and Ray Jobs to say so
        # (about 2 s of every job's end, measured).
        outcome = read_outcome(self._store.location, account, job_id, record.runtime.attempts)
        if outcome is None:
            status = self._drivers.status(record.runtime.driver_id)
            if status.alive:
                return
            delete_assignment(self._store.location, record.runtime.driver_id)
            # It ended without an answer (crashed, killed, its node or cluster lost): the
            # next attempt resumes from the committed parts.
            ended = status.value.lower()
            if record.runtime.attempts >= MAX_ATTEMPTS:
                self._fail(record, f"gave up after {record.runtime.attempts} attempts: driver {ended}")
            else:
                self._move_if(record, S.RUNNING, S.RE_QUEUEING, f"driver {record.runtime.driver_id} {ended}")
            return
        delete_assignment(self._store.location, record.runtime.driver_id)
        self._spares.give_back(record.runtime.driver_id)  # it waits for the next job
        if outcome.state == OutcomeState.COMPLETED:
            self._move_if(record, S.RUNNING, S.WRITING_RESULTS, "")
            self._finish(self._reload(record), S.COMPLETED, "")
        elif outcome.state == OutcomeState.OUTPUT_CAP_REACHED:
            self._finish(record, S.EXPIRED, "output size cap reached; partial results kept")
        elif outcome.state == OutcomeState.FAILED:
            self._fail(record, outcome.message)

    def _time_limit(self, record: JobRecord) -> timedelta:
        seconds = self._config.max_job_duration_seconds
        if record.job.max_duration:
            seconds = min(seconds, duration_seconds(record.job.max_duration))
        return timedelta(seconds=seconds)

    def _publish_progress(self, record: JobRecord) -> None:
        output = Location(self._configs.files_url(record.job.output_dataset_id))
        status = read_progress(output)
        if status is None:
            return
        progress = status.progress
        with self._lock:
            fresh = self._reload(record)
            if fresh.job.state == record.job.state and fresh.job.job_progress != progress:
                if progress.total_processed_requests and not fresh.job.job_progress.total_processed_requests:
                    metrics.observe_first_row(fresh.runtime.running_since, load_commits(output))
                fresh.job.job_progress = progress
                fresh.job.update_time = now()
                self._store.put_job(fresh)

    def _finish(self, record: JobRecord, target: JobState, message: str) -> None:
        """Publish what was committed, mark the output dataset READY, then `target`.

        The publish runs off the loop (`Publisher`): until it has ended this returns at
        once and the job keeps its stored state, so a later pass comes back here."""
        output = Location(self._configs.files_url(record.job.output_dataset_id))
        if not self._publisher.published(output.url):
            return
        commits = load_commits(output)
        account = record.runtime.account
        _, output_id = parse_reference(record.job.output_dataset_id, DATASETS, account)
        with self._lock:
            fresh = self._reload(record)
            if fresh.job.job_progress.total_input_requests:
                total = fresh.job.job_progress.total_input_requests
                fresh.job.job_progress = progress_of(commits, total)
            dataset = self._store.get_dataset(account, output_id)
            if dataset is not None:
                dataset.state = DatasetState.READY
                dataset.example_count = str(sum(c.results + c.errors for c in commits))
                dataset.size_bytes = str(sum(c.bytes for c in commits))
                dataset.update_time = now()
                self._store.put_dataset(account, output_id, dataset)
            self._move(fresh, target, message)

    # -------------------------------------------------------------- records

    def _get(self, account: str, job_id: str) -> JobRecord:
        record = self._store.get_job(account, job_id)
        if record is None:
            raise NotFound(f"batch inference job {job_id} not found")
        return record

    def _get_visible(self, account: str, job_id: str) -> JobRecord:
        """As a client may see it: a deleted job still stopping is gone for them."""
        record = self._get(account, job_id)
        if record.runtime.delete_requested:
            raise NotFound(f"batch inference job {job_id} not found")
        return record

    def _reload(self, record: JobRecord) -> JobRecord:
        return self._get(record.runtime.account, record.job.name.rsplit("/", 1)[-1])

    def _move(self, record: JobRecord, target: JobState, message: str) -> None:
        """Apply one transition and store it (caller holds the lock)."""
        source, record.job = record.job.state, transition(record.job, target, message)
        self._store.put_job(record)
        if target.terminal and record.runtime.delete_requested:
            self._store.delete_job(record.runtime.account, record.job.name.rsplit("/", 1)[-1])
        log_job_state(record, source.value, message)
        metrics.count_state_change(target.value)
        if target in RELEASES_ENGINES and record.job.output_dataset_id:
            # Its rows leave the pool's queues and its requests are aborted inside the
            # engines at once; no other job's rows are touched.
            self._pool.end_job.remote(self._configs.files_url(record.job.output_dataset_id))

    def _move_if(self, record: JobRecord, expected: JobState, target: JobState, message: str) -> bool:
        with self._lock:
            fresh = self._reload(record)
            if fresh.job.state != expected:
                return False  # a concurrent request (cancel) moved it first
            self._move(fresh, target, message)
            return True

    def _fail(self, record: JobRecord, message: str) -> None:
        with self._lock:
            fresh = self._reload(record)
            if not fresh.job.state.terminal:
                self._move(fresh, S.FAILED, message)


def scheduler_name(storage: str) -> str:
    """One scheduler per storage root: two services on one cluster never share one."""
    return f"raybatch-scheduler-{hashlib.sha256(storage.encode()).hexdigest()[:12]}"


def scheduler_handle(config: ServiceConfig):
    """The one scheduler actor of this storage, created if it does not exist yet.
    Detached: it outlives the API replicas; restarted by Ray if its process dies."""
    actor = ray.remote(JobScheduler).options(
        name=scheduler_name(config.storage),
        namespace=NAMESPACE,
        lifetime="detached",
        get_if_exists=True,
        max_restarts=-1,
        max_task_retries=-1,
        max_concurrency=16,
        num_cpus=0,
    )
    return actor.remote(config)
