"""Per-account quotas (issue 10, item 6): how many datasets an account holds, how many
bytes it stores, how many of its jobs wait to run. Each check reads only the account's
own records, and refuses with 429 RESOURCE_EXHAUSTED (`QuotaExceeded`) saying which
quota is full and how to free it. Running jobs are bounded by admission instead (the
scheduler starts at most `max_running_jobs` of an account; the rest wait PENDING).

The checks are made before the record is written, without a lock across API replicas:
requests racing each other may pass a quota by the few that were in flight together.
"""

from __future__ import annotations

from typing import Optional

from raybatch.config import ServiceConfig
from raybatch.exceptions import QuotaExceeded
from raybatch.resources import Dataset, DatasetState, JobState
from raybatch.store import Store

# Jobs that wait for a running slot: what max_queued_jobs counts.
QUEUED_STATES = frozenset({JobState.VALIDATING, JobState.PENDING, JobState.RE_QUEUEING})


def dataset_bytes(store: Store, account: str, dataset: Dataset) -> int:
    """What one dataset counts against max_stored_bytes: a READY dataset its sizeBytes
    (the expanded size; a job's output its committed bytes), an upload in progress the
    bytes received so far, an output being written nothing yet (its job's output cap
    bounds it)."""
    if dataset.state == DatasetState.READY:
        return int(dataset.size_bytes or 0)
    if dataset.source_job_name:
        return 0
    files = store.dataset_files(account, dataset.name.rsplit("/", 1)[-1])
    return sum(files.size(name) for name in files.list())


def stored_bytes(store: Store, account: str, datasets: Optional[list[Dataset]] = None, leave_out: str = "") -> int:
    """The account's stored bytes, leaving out the dataset named `leave_out` (the one an
    upload is about to replace or add to)."""
    datasets = store.list_datasets(account) if datasets is None else datasets
    return sum(dataset_bytes(store, account, d) for d in datasets if d.name.rsplit("/", 1)[-1] != leave_out)


class AccountQuotas:
    """The quota checks of one service: the API's for datasets, the scheduler's for jobs."""

    def __init__(self, store: Store, config: ServiceConfig):
        self._store = store
        self._config = config

    def room_for_bytes(self, account: str, dataset_id: str) -> int:
        """Bytes dataset `dataset_id` may hold within the account's stored-bytes quota."""
        quota = self._config.quota(account).max_stored_bytes
        return max(0, quota - stored_bytes(self._store, account, leave_out=dataset_id))

    def bytes_refusal(self, account: str, wanted: int, room: int) -> QuotaExceeded:
        quota = self._config.quota(account).max_stored_bytes
        return QuotaExceeded(
            f"account {account} would store more than its quota of {quota} bytes: this dataset "
            f"needs {wanted}, {room} are left; delete datasets it no longer needs"
        )

    def check_new_dataset(self, account: str, datasets: Optional[list[Dataset]] = None) -> None:
        quota = self._config.quota(account).max_datasets
        held = self._store.count_datasets(account) if datasets is None else len(datasets)
        if held >= quota:
            raise QuotaExceeded(
                f"account {account} has {held} datasets, its quota of {quota} "
                "(output datasets of jobs count); delete datasets it no longer needs"
            )

    def check_new_job(self, account: str) -> None:
        """A new job waits to run, makes an output dataset and stores its results."""
        quota = self._config.quota(account)
        queued = sum(1 for r in self._store.list_jobs(account) if r.job.state in QUEUED_STATES)
        if queued >= quota.max_queued_jobs:
            raise QuotaExceeded(
                f"account {account} has {queued} jobs waiting to run, its quota of "
                f"{quota.max_queued_jobs}; create more once some have started or ended, or cancel some"
            )
        datasets = self._store.list_datasets(account)
        self.check_new_dataset(account, datasets)
        stored = stored_bytes(self._store, account, datasets)
        if stored >= quota.max_stored_bytes:
            raise QuotaExceeded(
                f"account {account} stores {stored} bytes, its quota of {quota.max_stored_bytes}, and a "
                "job's output would add to it; delete datasets it no longer needs"
            )
