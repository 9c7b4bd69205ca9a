"""Dataset validation in the background (issue 10, item 7).

`:validateUpload` and `:upload` hand the validation (`DatasetService.validate`: sizes
measured, files expanded, lines counted, up to 500 MB) to a thread of the API replica
and wait for it `validation_wait_seconds` (1 s): a small dataset answers READY, or its
error, as before; a larger one answers UPLOADING at once and goes on validating. Its
progress is kept beside the dataset (`datasets/{id}/validation.json`) and shown in the
dataset's `status.message` by every GET and list, from any replica:

    UPLOADING, status OK "validating: counting lines, 120000000 of 250000000 bytes read (48%), 1000000 lines so far"
      ├─→ READY, status OK ""                     (exampleCount and sizeBytes set)
      └─→ UPLOADING, status <code> "<why>"        (nothing published; fix and :validateUpload again)

Who owns a validation: the run named in validation.json, which its replica's heartbeat
thread rewrites every second. A replica that dies stops the heartbeat; the next GET (or
`:validateUpload`) of the dataset, on any replica, finds it older than
`validation_stale_seconds` and runs the validation again there (at most
MAX_RESTARTS times; then the dataset gets status ABORTED, and `:validateUpload`
starts afresh). A run that finds another run's name in the record stops without
writing anything. Nothing is lost when a run stops anywhere: the files it took out of
the upload area wait in `validating/` for the next run, and only the last step
publishes (into `files/`, then READY).

While a validation runs, the dataset's files cannot change: `:upload`,
`:getUploadEndpoint` and signed PUTs are refused (400 FAILED_PRECONDITION).
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor, wait
from typing import Iterable, Optional

from pydantic import BaseModel, Field, ValidationError

from raybatch.api.datasets import DatasetService
from raybatch.config import ServiceConfig
from raybatch.exceptions import ApiError, NotFound
from raybatch.resources import DATASETS, Dataset, DatasetState, Status, now, resource_name
from raybatch.store import Store

logger = logging.getLogger("raybatch.api.validation")

VALIDATION = "validation.json"
MAX_RESTARTS = 3  # runs taken over after their replica stopped, before giving up
CHECKS_WAIT_SECONDS = 60.0  # the most a request waits for the quick checks (storage calls)


class ValidationRecord(BaseModel):
    """What `validation.json` holds: the run that owns the validation, its heartbeat,
    and how far it got."""

    run_id: str
    started: float  # epoch seconds
    heartbeat: float  # epoch seconds; older than validation_stale_seconds = its replica stopped
    phase: str = "queued"  # queued | checking | size | lines | publishing
    done: int = 0  # expanded bytes read in this phase
    total: int = 0  # expanded bytes in all (known in the "lines" phase)
    lines: int = 0  # examples counted so far
    restarts: int = 0
    delete_on_failure: list[str] = Field(default_factory=list, description="Files of an "
                                         ":upload, removed if the validation fails (a "
                                         "failed upload leaves nothing behind).")

    def message(self) -> str:
        done = f"{self.done} of {self.total} bytes read" + (
            f" ({100 * self.done // self.total}%)" if self.total else "")
        text = {
            "queued": "validating: waiting for a free validation slot",
            "checking": "validating: checking the registered files",
            "size": f"validating: measuring the expanded size, {self.done} bytes so far",
            "lines": f"validating: counting lines, {done}, {self.lines} lines so far",
            "publishing": f"validating: publishing the files ({self.lines} lines)",
        }.get(self.phase, f"validating: {self.phase}")
        if self.restarts:
            text += f" (restarted {self.restarts}x: the replica validating it stopped)"
        return text


class Superseded(Exception):
    """Another run took this validation over (or the dataset was deleted): stop, and
    write nothing."""


class _Run:
    def __init__(self, account: str, dataset_id: str, record: ValidationRecord):
        self.account, self.dataset_id, self.record = account, dataset_id, record
        self.lock = threading.Lock()  # the heartbeat's write vs. the run's end
        self.superseded = False
        self.finished = False
        self.future: Optional[Future] = None
        # Set when the quick checks are done (registration, key, sizes as stored) and
        # the reading starts, or when the run ends: a request waits for that at least,
        # so what those checks refuse is always the request's own answer.
        self.checked = threading.Event()
        self.started = threading.Event()  # a pool thread took it


def validation_path(account: str, dataset_id: str) -> str:
    return f"{resource_name(account, DATASETS, dataset_id)}/{VALIDATION}"


def read_validation(store: Store, account: str, dataset_id: str) -> Optional[ValidationRecord]:
    """The dataset's validation in progress, or None."""
    path = validation_path(account, dataset_id)
    if not store.location.exists(path):
        return None
    try:
        return ValidationRecord.model_validate_json(store.location.read_bytes(path))
    except (FileNotFoundError, ValidationError):  # removed meanwhile, or torn on a crash
        return None


class BackgroundValidations:
    """The validations of one API replica: a small thread pool, a heartbeat thread, and
    the views that merge progress into the dataset resource."""

    def __init__(self, store: Store, datasets: DatasetService, config: ServiceConfig):
        self._store = store
        self._datasets = datasets
        self._config = config
        self._pool = ThreadPoolExecutor(config.max_concurrent_validations, thread_name_prefix="raybatch-validate")
        self._runs: dict[tuple[str, str], _Run] = {}
        self._lock = threading.Lock()
        self._heartbeat: Optional[threading.Thread] = None
        self._beat_seconds = min(1.0, config.validation_stale_seconds / 4)
        datasets.validating = self.running

    # ------------------------------------------------------------------ records

    def _path(self, account: str, dataset_id: str) -> str:
        return validation_path(account, dataset_id)

    def record(self, account: str, dataset_id: str) -> Optional[ValidationRecord]:
        return read_validation(self._store, account, dataset_id)

    def _live(self, record: Optional[ValidationRecord]) -> bool:
        return record is not None and time.time() - record.heartbeat < self._config.validation_stale_seconds

    def running(self, account: str, dataset_id: str) -> bool:
        return self._live(self.record(account, dataset_id))

    # ------------------------------------------------------------------- starts

    def validate(self, account: str, dataset_id: str, delete_on_failure: Iterable[str] = ()) -> Dataset:
        """`:validateUpload` (and the end of `:upload`): start a validation, or join the
        one running, and wait for it up to `validation_wait_seconds`. Returns the
        dataset (READY, or UPLOADING with its progress); a validation that failed within
        the wait raises its error, as the request's answer."""
        dataset = self._datasets.get(account, dataset_id)
        if dataset.state == DatasetState.READY:
            # Idempotent, as Fireworks': after `:upload` (which validates) a client
            # following the two-step recipe still calls :validateUpload. Nothing changes.
            return dataset
        self._datasets._uploading(account, dataset_id)  # a job's output dataset: 400
        run = self._start(account, dataset_id, list(delete_on_failure))
        if run is not None and run.future is not None:
            waiting = self._config.validation_wait_seconds
            deadline = time.monotonic() + waiting
            if run.started.wait(waiting):  # not queued behind other validations
                run.checked.wait(CHECKS_WAIT_SECONDS)
            done, _ = wait([run.future], timeout=max(0.0, deadline - time.monotonic()))
            if done:
                error = run.future.exception()
                if error is not None and not isinstance(error, Superseded):
                    raise error
        return self.view(self._datasets.get(account, dataset_id))

    def _start(self, account: str, dataset_id: str, delete_on_failure: list[str],
               restarts: int = 0) -> Optional[_Run]:
        """A new run, unless one is already live (then None)."""
        with self._lock:
            current = self._runs.get((account, dataset_id))
            if current is not None and not current.finished:
                return current
            if self._live(self.record(account, dataset_id)):
                return None  # another replica's, still beating
            started = time.time()
            record = ValidationRecord(run_id=uuid.uuid4().hex, started=started, heartbeat=started,
                                      restarts=restarts, delete_on_failure=delete_on_failure)
            run = _Run(account, dataset_id, record)
            self._store.location.write_atomic(self._path(account, dataset_id), record.model_dump_json().encode())
            self._runs[(account, dataset_id)] = run
            run.future = self._pool.submit(self._run, run)
            if self._heartbeat is None:
                self._heartbeat = threading.Thread(target=self._beat, name="raybatch-validate-heartbeat", daemon=True)
                self._heartbeat.start()
            return run

    # ------------------------------------------------------------------- a run

    def _run(self, run: _Run) -> Dataset:
        account, dataset_id = run.account, run.dataset_id
        run.record = run.record.model_copy(update={"phase": "checking"})
        run.started.set()

        def progress(phase: str, done: int, total: int, lines: int) -> None:
            run.checked.set()
            if phase == "publishing":  # the last chance to stop: make sure, from storage
                stored_record = self.record(account, dataset_id)
                if stored_record is None or stored_record.run_id != run.record.run_id:
                    run.superseded = True
            if run.superseded:
                raise Superseded()
            run.record = run.record.model_copy(update={"phase": phase, "done": done, "total": total, "lines": lines})

        try:
            dataset = self._datasets.validate(account, dataset_id, progress)
        except Superseded:
            self._end(run, remove_record=False)
            raise
        except BaseException as error:
            self._fail(run, error)
            raise
        finally:
            run.checked.set()
        self._end(run)
        return dataset

    def _fail(self, run: _Run, error: BaseException) -> None:
        """Record why, in the dataset's status, unless another run owns it now."""
        account, dataset_id = run.account, run.dataset_id
        stored_record = self.record(account, dataset_id)
        if run.superseded or stored_record is None or stored_record.run_id != run.record.run_id:
            self._end(run, remove_record=False)
            return
        try:
            self._record_failure(run, error)
        finally:
            self._end(run)

    def _record_failure(self, run: _Run, error: BaseException) -> None:
        account, dataset_id = run.account, run.dataset_id
        if isinstance(error, ApiError):
            status = Status(code=error.status, message=error.message)
        else:
            logger.exception("validation of %s/%s failed", account, dataset_id, exc_info=error)
            status = Status(code="INTERNAL", message=f"validation stopped ({type(error).__name__}: {error}); "
                            "nothing was published: call :validateUpload again")
        try:
            files = self._store.dataset_files(account, dataset_id)
            for name in run.record.delete_on_failure:
                files.delete(name)  # a failed :upload leaves nothing behind
            self._set_status(account, dataset_id, status)
        except NotFound:
            pass  # deleted meanwhile

    def _set_status(self, account: str, dataset_id: str, status: Status) -> None:
        dataset = self._datasets.get(account, dataset_id)
        if dataset.state == DatasetState.UPLOADING:
            self._store.put_dataset(account, dataset_id, dataset.model_copy(update={"status": status, "update_time": now()}))

    def _end(self, run: _Run, remove_record: bool = True) -> None:
        with run.lock:
            run.finished = True
            if remove_record:
                self._store.location.delete(self._path(run.account, run.dataset_id))
        with self._lock:
            if self._runs.get((run.account, run.dataset_id)) is run:
                del self._runs[(run.account, run.dataset_id)]

    def _beat(self) -> None:
        """Every second: each run of this replica rewrites its record (progress and
        heartbeat), or learns that another run took it over."""
        while True:
            time.sleep(self._beat_seconds)
            with self._lock:
                runs = list(self._runs.values())
            for run in runs:
                try:
                    with run.lock:
                        if run.finished:
                            continue
                        stored_record = self.record(run.account, run.dataset_id)
                        if stored_record is None or stored_record.run_id != run.record.run_id:
                            run.superseded = True
                            continue
                        beat = run.record.model_copy(update={"heartbeat": time.time()})
                        self._store.location.write_atomic(self._path(run.account, run.dataset_id),
                                                          beat.model_dump_json().encode())
                except Exception:  # storage hiccup: the next beat tries again
                    logger.exception("validation heartbeat of %s/%s failed", run.account, run.dataset_id)

    # -------------------------------------------------------------------- views

    def view(self, dataset: Dataset) -> Dataset:
        """The dataset as clients see it: while it validates, `status.message` shows the
        progress. A validation whose replica stopped is run again here."""
        if dataset.state != DatasetState.UPLOADING or dataset.source_job_name:
            return dataset
        account, dataset_id = dataset.name.split("/")[1], dataset.name.rsplit("/", 1)[-1]
        with self._lock:
            run = self._runs.get((account, dataset_id))  # alive, however late its heartbeat
        if run is not None:
            # This replica's own run: its progress as of now, not as of the last
            # heartbeat (other replicas show the stored record, at most a beat old).
            return dataset.model_copy(update={"status": Status(code="OK", message=run.record.message())})
        record = self.record(account, dataset_id)
        if record is None:
            return dataset
        if not self._live(record):
            if record.restarts >= MAX_RESTARTS:
                status = Status(code="ABORTED", message=f"validation was interrupted {record.restarts + 1} times "
                                "(the replicas validating it stopped); nothing was published: call "
                                ":validateUpload again")
                self._set_status(account, dataset_id, status)
                self._store.location.delete(self._path(account, dataset_id))
                return dataset.model_copy(update={"status": status})
            logger.warning("validation of %s/%s stopped answering; running it again here", account, dataset_id)
            self._start(account, dataset_id, record.delete_on_failure, restarts=record.restarts + 1)
            record = self.record(account, dataset_id) or record
        return dataset.model_copy(update={"status": Status(code="OK", message=record.message())})
