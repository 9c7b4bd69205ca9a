"""The service's records in object storage, the one source of truth.

    {root}/accounts/{account}/datasets/{id}/dataset.json      the Dataset resource
    {root}/accounts/{account}/datasets/{id}/files/...         its files (a job's output
                                                              folder for an output dataset)
    {root}/accounts/{account}/datasets/{id}/upload.json       files registered for signed PUTs
    {root}/accounts/{account}/datasets/{id}/uploads/{nonce}/  where those PUTs land; moved
                                                              to files/ by :validateUpload
    {root}/accounts/{account}/batchInferenceJobs/{id}/job.json  JobRecord
    {root}/keys/{key_id}.json                                 ApiKeyRecord (hash only)
    {root}/service/signing-key                                signs local upload/download URLs
                                                              (local storage only)
    {root}/service/active-jobs/{account}.{job_id}             empty: the job has not ended
                                                              (the scheduler's index)

Local storage is the service user's only: folders 0700, files 0600 (`storage`).

Every ID reaching this module was checked by `resources.check_id`; the checks here are
a second line of defence.
"""

from __future__ import annotations

import os
import secrets
from typing import Optional

from raybatch.resources import (
    DATASETS,
    JOBS,
    ApiKeyRecord,
    Dataset,
    JobRecord,
    check_id,
    resource_name,
)
from raybatch.storage import FOLDER_MODE, Location, _is_local, make_private_folders

SIGNING_KEY = "service/signing-key"
# The index of jobs that have not ended, so that the scheduler's pass reads those
# records only, not every record of every account. A marker is written before a new
# job's record and removed after its terminal one (terminal is final), so a job that
# has not ended is never missing; a crash can only leave a marker of an ended job, which
# `active_jobs` removes. Stores from before the index get it built once.
ACTIVE_JOBS = "service/active-jobs"
ACTIVE_JOBS_BUILT = "service/active-jobs.built"


class Store:
    def __init__(self, root_url: str):
        self.root_url = root_url.rstrip("/")
        self.location = Location(self.root_url)
        self.local = _is_local(self.location.fs)
        if self.local:
            # The root closed to others also closes what an older version created 0755.
            make_private_folders(self.location.root)
            if os.stat(self.location.root).st_uid == os.getuid():
                os.chmod(self.location.root, FOLDER_MODE)

    def __reduce__(self):
        return (Store, (self.root_url,))

    # ----------------------------------------------------------------- datasets

    def _dataset_dir(self, account: str, dataset_id: str) -> str:
        return resource_name(check_id(account), DATASETS, check_id(dataset_id))

    def dataset_files_url(self, account: str, dataset_id: str) -> str:
        return f"{self.root_url}/{self._dataset_dir(account, dataset_id)}/files"

    def dataset_files(self, account: str, dataset_id: str) -> Location:
        return Location(self.dataset_files_url(account, dataset_id))

    def dataset_uploads(self, account: str, dataset_id: str) -> str:
        """Store-relative folder where signed PUTs land, one subfolder per registration.
        Nothing reads it but :validateUpload, which moves registered files to `files/`."""
        return f"{self._dataset_dir(account, dataset_id)}/uploads"

    def get_dataset(self, account: str, dataset_id: str) -> Optional[Dataset]:
        path = f"{self._dataset_dir(account, dataset_id)}/dataset.json"
        if not self.location.exists(path):
            return None
        return Dataset.model_validate_json(self.location.read_bytes(path))

    def put_dataset(self, account: str, dataset_id: str, dataset: Dataset) -> None:
        path = f"{self._dataset_dir(account, dataset_id)}/dataset.json"
        self.location.write_atomic(path, dataset.model_dump_json(by_alias=True).encode())

    def list_datasets(self, account: str) -> list[Dataset]:
        found = []
        for dataset_id in self.location.list(f"accounts/{check_id(account)}/{DATASETS}"):
            dataset = self.get_dataset(account, dataset_id)
            if dataset is not None:
                found.append(dataset)
        return found

    def count_datasets(self, account: str) -> int:
        """How many datasets the account holds: one listing, no record read."""
        return len(self.location.list(f"accounts/{check_id(account)}/{DATASETS}"))

    def delete_dataset(self, account: str, dataset_id: str) -> None:
        # The record first: a half-deleted dataset is then simply gone, not corrupt.
        self.location.delete(f"{self._dataset_dir(account, dataset_id)}/dataset.json")
        self.location.delete(self._dataset_dir(account, dataset_id))

    # --------------------------------------------------------------------- jobs

    def _job_path(self, account: str, job_id: str) -> str:
        return f"{resource_name(check_id(account), JOBS, check_id(job_id))}/job.json"

    def get_job(self, account: str, job_id: str) -> Optional[JobRecord]:
        path = self._job_path(account, job_id)
        if not self.location.exists(path):
            return None
        return JobRecord.model_validate_json(self.location.read_bytes(path))

    def put_job(self, record: JobRecord, new: bool = False) -> None:
        """Store a job record; `new`: the job's first, which enters the active index."""
        job_id = record.job.name.rsplit("/", 1)[-1]
        path = self._job_path(record.runtime.account, job_id)
        marker = self._active_marker(record.runtime.account, job_id)
        if new:
            self.location.write_atomic(marker, b"")
        self.location.write_atomic(path, record.model_dump_json(by_alias=True).encode())
        if record.job.state.terminal:
            self.location.delete(marker)

    def _active_marker(self, account: str, job_id: str) -> str:
        return f"{ACTIVE_JOBS}/{check_id(account)}.{check_id(job_id)}"

    def active_jobs(self) -> list[JobRecord]:
        """Every job that has not ended, of every account: one listing and a read per
        such job, whatever the number of ended ones."""
        if not self.location.exists(ACTIVE_JOBS_BUILT):
            for record in self.all_jobs():
                if not record.job.state.terminal:
                    self.location.write_atomic(self._active_marker(record.runtime.account, record.job.name.rsplit("/", 1)[-1]), b"")
            self.location.write_atomic(ACTIVE_JOBS_BUILT, b"")
        found = []
        for name in self.location.list(ACTIVE_JOBS):
            account, _, job_id = name.partition(".")
            record = self.get_job(account, job_id)
            if record is None:
                continue  # being created: its marker is written before its record
            if record.job.state.terminal:
                self.location.delete(f"{ACTIVE_JOBS}/{name}")  # left by a crash after its end
                continue
            found.append(record)
        return found

    def list_jobs(self, account: str) -> list[JobRecord]:
        found = []
        for job_id in self.location.list(f"accounts/{check_id(account)}/{JOBS}"):
            record = self.get_job(account, job_id)
            if record is not None:
                found.append(record)
        return found

    def all_jobs(self) -> list[JobRecord]:
        return [record for account in self.location.list("accounts") for record in self.list_jobs(account)]

    def delete_job(self, account: str, job_id: str) -> None:
        self.location.delete(self._active_marker(account, job_id))
        self.location.delete(self._job_path(account, job_id))
        self.location.delete(resource_name(check_id(account), JOBS, check_id(job_id)))

    # --------------------------------------------------------------------- keys

    def get_key(self, key_id: str) -> Optional[ApiKeyRecord]:
        path = f"keys/{check_id(key_id)}.json"
        if not self.location.exists(path):
            return None
        return ApiKeyRecord.model_validate_json(self.location.read_bytes(path))

    def put_key(self, record: ApiKeyRecord) -> None:
        self.location.write_atomic(f"keys/{check_id(record.key_id)}.json", record.model_dump_json().encode())

    def list_keys(self) -> list[ApiKeyRecord]:
        return [self.get_key(name[: -len(".json")]) for name in self.location.list("keys") if name.endswith(".json")]

    def signing_key(self) -> bytes:
        """A random secret made on first use and shared by every API replica. Local
        storage only: on S3 the URLs are S3's own, and no key is kept in the bucket."""
        if not self.local:
            raise ValueError("the URL signing key exists on local storage only")
        if not self.location.exists(SIGNING_KEY):
            self.location.write_atomic(SIGNING_KEY, secrets.token_bytes(32))
        return self.location.read_bytes(SIGNING_KEY)
