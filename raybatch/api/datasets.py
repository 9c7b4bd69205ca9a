"""Dataset operations behind the routes: create, upload (one request, or signed URLs
then `:validateUpload`), download URLs (with lineage), update, delete.

A dataset is UPLOADING until its upload is validated (line count and total size
checked, the size being what gzip files expand to), then READY and unchangeable. A
job's output dataset becomes READY when the job ends.

Signed PUTs land in the dataset's upload area, under the nonce of the registration
that issued their URLs (`signing.upload_path`); `:validateUpload` measures the
registered files there itself and only then moves them into `files/`, which is all a
job reads. So a URL used after READY, or one of an earlier registration, writes where
nothing reads, and a registration whose key was revoked is refused.

Validation (`validate`) is synchronous here; `validation.BackgroundValidations` runs it
in a thread of the API replica, records its progress and takes it over when the replica
that ran it stopped (issue 10, item 7). Before measuring anything it moves the
registered files out of the upload area into `validating/`, where no URL writes: what
it measures is what it publishes.
"""

from __future__ import annotations

import json
import re
import secrets
from typing import IO, Callable, Optional

from raybatch.api.external_urls import ExternalFiles, check_external_url
from raybatch.config import ServiceConfig
from raybatch.exceptions import FailedPrecondition, InvalidArgument, NotFound, PayloadTooLarge
from raybatch.exceptions import ConfigError
from raybatch.pipeline.read import expanded_size, shard_lines
from raybatch.quotas import AccountQuotas
from raybatch.resources import (
    DATASETS,
    JOBS,
    Dataset,
    DatasetFields,
    DatasetState,
    Status,
    check_id,
    now,
    parse_reference,
    resource_name,
)
from raybatch.output_layout import load_commits
from raybatch.storage import TEMPORARY_MARKER, Location, is_temporary, list_shards
from raybatch.store import Store

# Plain file names only: no folders, nothing hidden, nothing the pipeline would skip.
FILENAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}\.jsonl")
UPLOAD_PLAN = "upload.json"  # files registered by :getUploadEndpoint, with their sizes
CHUNK = 1 << 20
CLAIMED = "validating"  # registered files a validation took out of the upload area
# progress(phase, bytes done, bytes in all, lines counted so far): called as a
# validation goes. "size": the files expanded so far (the total is not known yet: 0);
# "lines": the expanded bytes whose lines were counted, of the expanded total; then
# "publishing". The files are read twice, once per phase. Whatever it raises ends the
# validation.
Progress = Callable[[str, int, int, int], None]
# `estimatedTokenCount` is the examples' bytes over this: about right for English text
# and JSON under common BPE tokenizers, and known without loading one. A job's dry run
# (`jobs/dry_run.py`) counts with the model's own tokenizer where it can.
TOKEN_ESTIMATE_BYTES = 4


def estimate_tokens(byte_count: int) -> int:
    return -(-byte_count // TOKEN_ESTIMATE_BYTES)


def check_filename(name: str) -> str:
    if not isinstance(name, str) or not FILENAME.fullmatch(name) or ".." in name:
        raise InvalidArgument(
            f"invalid file name {name!r}: use letters, digits, '.', '_', '-' and end in .jsonl"
        )
    if is_temporary(name):
        raise InvalidArgument(f"invalid file name {name!r}: {TEMPORARY_MARKER!r} marks the service's own unfinished files")
    return name


def upload_filename(given: str) -> str:
    """The name an `:upload` file is stored under. Fireworks takes any name, and the SDK's
    `datasets.upload(file=bytes)` sends none (httpx calls it `upload`): so the name's
    last path segment, every character outside the safe set a '-', and `.jsonl` added
    when missing. What the pipeline reads does not depend on it (gzip is found by its
    magic bytes), and the answer's `filename` says what was stored."""
    base = given.replace("\\", "/").rsplit("/", 1)[-1]
    stem = base[:-len(".jsonl")] if base.endswith(".jsonl") else base
    stem = re.sub(r"[^A-Za-z0-9._-]", "-", stem).replace(TEMPORARY_MARKER, "-")
    stem = re.sub(r"\.{2,}", ".", stem).lstrip("._-")[:190] or "upload"
    return check_filename(f"{stem}.jsonl")


def _being_written(dataset: Dataset) -> bool:
    """A job's output dataset whose job has not published it yet."""
    return bool(dataset.source_job_name) and dataset.state == DatasetState.UPLOADING


class DatasetService:
    def __init__(self, store: Store, config: ServiceConfig):
        self.store = store
        self.config = config
        self.quotas = AccountQuotas(store, config)

    def get(self, account: str, dataset_id: str) -> Dataset:
        dataset = self.store.get_dataset(account, check_id(dataset_id))
        if dataset is None:
            raise NotFound(f"dataset {dataset_id} not found")
        return dataset

    def create(self, account: str, dataset_id: str, fields: DatasetFields, created_by: str,
               source_dataset_id: Optional[str] = None) -> Dataset:
        check_id(dataset_id, "dataset ID")
        if getattr(fields, "external_url", None) is not None:
            check_external_url(fields.external_url, self.config)
        if source_dataset_id is not None:
            source_account, source_id = parse_reference(source_dataset_id, DATASETS, account)
            if source_account != account or self.store.get_dataset(account, source_id) is None:
                raise NotFound(f"source dataset {source_dataset_id} not found")
        if self.store.get_dataset(account, dataset_id) is not None:
            from raybatch.exceptions import AlreadyExists

            raise AlreadyExists(f"dataset {dataset_id} already exists")
        self.quotas.check_new_dataset(account)
        time_now = now()
        dataset = Dataset(
            name=resource_name(account, DATASETS, dataset_id),
            create_time=time_now,
            update_time=time_now,
            created_by=created_by,
            source_dataset_id=source_dataset_id,
            **fields.model_dump(exclude_none=True),
        )
        self.store.put_dataset(account, dataset_id, dataset)
        return dataset

    def update(self, account: str, dataset_id: str, fields: DatasetFields) -> Dataset:
        dataset = self.get(account, dataset_id)
        dataset = dataset.model_copy(update={**fields.model_dump(exclude_none=True), "update_time": now()})
        self.store.put_dataset(account, dataset_id, dataset)
        return dataset

    def delete(self, account: str, dataset_id: str) -> None:
        dataset = self.get(account, dataset_id)
        for record in self.store.list_jobs(account):
            uses = {record.job.input_dataset_id, record.job.output_dataset_id}
            if dataset.name in uses and not record.job.state.terminal:
                raise FailedPrecondition(f"dataset {dataset_id} is in use by {record.job.name}, which has not ended")
        if self.validating(account, dataset_id):
            raise FailedPrecondition(f"dataset {dataset_id} is being validated; delete it once that has ended "
                                     "(its status shows the progress)")
        self.store.delete_dataset(account, dataset_id)

    def _uploading(self, account: str, dataset_id: str) -> Dataset:
        dataset = self.get(account, dataset_id)
        if dataset.state != DatasetState.UPLOADING or dataset.source_job_name:
            raise FailedPrecondition(f"dataset {dataset_id} is {dataset.state.value}; its files cannot change")
        return dataset

    def _uploadable(self, account: str, dataset_id: str) -> Dataset:
        """UPLOADING, not being validated, and holding its own files (not an externalUrl)."""
        dataset = self._changeable(account, dataset_id)
        if dataset.external_url:
            raise FailedPrecondition(f"dataset {dataset_id} is read from its externalUrl {dataset.external_url}; "
                                     "it takes no uploads (:validateUpload reads it again)")
        return dataset

    # Set by BackgroundValidations: whether a validation of the dataset is running.
    validating: Callable[[str, str], bool] = staticmethod(lambda account, dataset_id: False)

    def _changeable(self, account: str, dataset_id: str) -> Dataset:
        """UPLOADING and not being validated: its files may change."""
        dataset = self._uploading(account, dataset_id)
        if self.validating(account, dataset_id):
            raise FailedPrecondition(
                f"dataset {dataset_id} is being validated; its files cannot change until that ends "
                "(its status shows the progress)"
            )
        return dataset

    def _file_sizes(self, account: str, dataset_id: str) -> dict[str, int]:
        """The dataset's files and their sizes, listed as a job lists its shards (the
        same function), so the checks measure exactly what a job will read."""
        files = self.store.dataset_files(account, dataset_id)
        try:
            shards = list_shards(files.url)
        except ConfigError:  # no files yet
            return {}
        return {shard.name: files.size(shard.name) for shard in shards}

    def upload(self, account: str, dataset_id: str, filename: str, source: IO[bytes]) -> dict:
        """`:upload` in one go: store one file, then validate the dataset (it becomes
        READY); if validation refuses it, the file is removed. The API validates in the
        background instead (`store_upload`, then `BackgroundValidations`)."""
        answer = self.store_upload(account, dataset_id, filename, source)
        try:
            self.validate(account, dataset_id)
        except BaseException:
            self.store.dataset_files(account, dataset_id).delete(filename)  # a failed upload leaves nothing behind
            raise
        return answer

    def store_upload(self, account: str, dataset_id: str, filename: str, source: IO[bytes]) -> dict:
        """Store one file of an `:upload` (within the dataset's and the account's room);
        validating it is the caller's next step."""
        self._uploadable(account, dataset_id)
        check_filename(filename)
        others = {n: size for n, size in self._file_sizes(account, dataset_id).items() if n != filename}
        room = self.config.max_dataset_bytes - sum(others.values())
        account_room = self.quotas.room_for_bytes(account, dataset_id) - sum(others.values())
        files = self.store.dataset_files(account, dataset_id)
        written = 0
        with files.open_atomic_writer(filename) as writer:
            while chunk := source.read(CHUNK):
                written += len(chunk)
                # Raising inside the writer discards the partial object.
                if written > room:
                    raise PayloadTooLarge(f"dataset would exceed its size limit of {self.config.max_dataset_bytes} bytes")
                if written > account_room:
                    raise self.quotas.bytes_refusal(account, sum(others.values()) + written, max(0, account_room))
                writer.write(chunk)
        dataset = self.get(account, dataset_id)
        return {
            "id": dataset_id,
            "object": "file",
            "bytes": written,
            "createdAt": int(dataset.create_time.timestamp()),
            "filename": filename,
            "purpose": "batch",
        }

    def upload_plan(self, account: str, dataset_id: str, filename_to_size: dict, key_id: str) -> tuple[str, dict[str, int]]:
        """`:getUploadEndpoint`: register the files about to be PUT (replacing any
        earlier registration, as Fireworks does, and discarding what was PUT for it);
        return (the registration's nonce, the files checked)."""
        self._uploadable(account, dataset_id)
        if not filename_to_size:
            raise InvalidArgument("filenameToSize is empty")
        if len(filename_to_size) > self.config.max_upload_files:
            raise InvalidArgument(
                f"filenameToSize names {len(filename_to_size)} files, over the limit of {self.config.max_upload_files}"
            )
        plan = {}
        for name, size in filename_to_size.items():
            try:
                plan[check_filename(name)] = int(size)
            except (TypeError, ValueError):
                raise InvalidArgument(f"size of {name!r} is not an integer") from None
            if plan[name] <= 0:
                raise InvalidArgument(f"file {name!r} is empty")
        if sum(plan.values()) > self.config.max_dataset_bytes:
            raise PayloadTooLarge(f"files total {sum(plan.values())} bytes, over the dataset limit of {self.config.max_dataset_bytes}")
        account_room = self.quotas.room_for_bytes(account, dataset_id)
        if sum(plan.values()) > account_room:
            raise self.quotas.bytes_refusal(account, sum(plan.values()), account_room)
        nonce = secrets.token_hex(16)
        record = {"nonce": nonce, "key": key_id, "files": plan}
        self.store.location.write_atomic(self._plan_path(account, dataset_id), json.dumps(record).encode())
        self.store.location.delete(self.store.dataset_uploads(account, dataset_id))
        self.store.location.delete(self._claimed(account, dataset_id))
        return nonce, plan

    def registration(self, account: str, dataset_id: str) -> Optional[dict]:
        """The current `:getUploadEndpoint` registration: nonce, key ID and files."""
        path = self._plan_path(account, dataset_id)
        if not self.store.location.exists(path):
            return None
        record = json.loads(self.store.location.read_bytes(path))
        if "files" not in record:  # written before registrations had a nonce: its URLs are void
            return {"nonce": None, "key": None, "files": record}
        return record

    def _plan_path(self, account: str, dataset_id: str) -> str:
        return f"{resource_name(account, DATASETS, dataset_id)}/{UPLOAD_PLAN}"

    def _claimed(self, account: str, dataset_id: str) -> str:
        return f"{resource_name(account, DATASETS, dataset_id)}/{CLAIMED}"

    def validate(self, account: str, dataset_id: str, progress: Optional[Progress] = None) -> Dataset:
        """`:validateUpload`: every registered file was PUT with its size, the total is
        within the limit, and the examples (non-blank lines) are counted → READY. Every
        size here is measured here: a registered size is only what the file must match.
        `progress` hears how far it got (see `Progress`). A dataset with an externalUrl
        is listed and measured there, in place, the same way."""
        report = progress or (lambda phase, read, stored, lines: None)
        dataset = self._uploading(account, dataset_id)
        if dataset.external_url:
            external = ExternalFiles(dataset.external_url)
            sources: dict[str, tuple[Location, str]] = {name: (external, name) for name in external.shards}
        else:
            files = self.store.dataset_files(account, dataset_id)
            sources = {name: (files, name) for name in self._file_sizes(account, dataset_id)}
        staged: dict[str, str] = {}  # name → its path in the claimed area
        registration = None if dataset.external_url else self.registration(account, dataset_id)
        if registration is not None:
            key = self.store.get_key(registration["key"]) if registration["key"] else None
            if registration["key"] and (key is None or key.revoked):
                raise FailedPrecondition(
                    f"the key that asked for dataset {dataset_id}'s upload URLs was revoked; "
                    "ask for new URLs with :getUploadEndpoint and upload again"
                )
            for name, size in registration["files"].items():
                path = (f"{self.store.dataset_uploads(account, dataset_id)}/{registration['nonce']}/{name}"
                        if registration["nonce"] else None)
                claimed = f"{self._claimed(account, dataset_id)}/{name}"
                if path and self.store.location.exists(path):
                    # Out of the URLs' reach before it is measured: a PUT still under
                    # way lands in the upload area, which is not read again.
                    self.store.location.move(path, claimed)
                if registration["nonce"] and self.store.location.exists(claimed):
                    staged[name] = claimed  # this call's, or one an earlier try claimed
                    sources[name] = (self.store.location, claimed)
                elif name not in sources:  # a file an earlier :validateUpload moved stays valid
                    raise FailedPrecondition(f"file {name} was registered but not uploaded")
                where, relative = sources[name]
                measured = where.size(relative)
                if measured != size:
                    raise FailedPrecondition(f"file {name} has {measured} bytes, {size} were registered")
        if not sources:
            raise FailedPrecondition(f"dataset {dataset_id} has no files; upload one first")
        limit = self.config.max_dataset_bytes
        stored = sum(where.size(relative) for where, relative in sources.values())
        if stored > limit:
            raise PayloadTooLarge(f"dataset has {stored} bytes, over its limit of {limit}")
        # The size that counts is what the files expand to: 50 KB of gzip can stand for
        # gigabytes. Each file is expanded only until the total passes the limit, or the
        # account's room if that is less (a READY dataset counts its expanded size).
        account_room = self.quotas.room_for_bytes(account, dataset_id)
        cap = min(limit, account_room)
        total = 0
        for name, (where, relative) in sources.items():
            done = total
            with where.open_read(relative) as handle:
                total += expanded_size(handle, cap - total, lambda n: report("size", done + n, 0, 0))
            report("size", total, 0, 0)
            if total > limit:
                raise PayloadTooLarge(
                    f"dataset expands to more than its limit of {limit} bytes "
                    f"(gzip files count decompressed; {name} passed it)"
                )
            if total > account_room:
                raise self.quotas.bytes_refusal(account, total, account_room)
        examples, read, example_bytes = 0, 0, 0
        for name, (where, relative) in sources.items():
            with where.open_read(relative) as handle:
                # Lines as a job reads them (gzip decompressed). A line too long to read
                # (None) is still an example: the job reports it.
                lines = shard_lines(handle, max_line_bytes=CHUNK, max_total_bytes=limit, name=name)
                for number, raw in lines:
                    read += (CHUNK if raw is None else len(raw)) + 1  # about: for the progress only
                    if raw is None or raw.strip():
                        examples += 1
                        example_bytes += CHUNK if raw is None else len(raw)
                    if number % 8192 == 0:
                        report("lines", min(read, total), total, examples)
            report("lines", min(read, total), total, examples)
        # Into files/ only now, measured; then the record. A crash between leaves the
        # dataset UPLOADING with its files in place, and a repeated call finishes it.
        report("publishing", total, total, examples)
        files_folder = f"{self.store._dataset_dir(account, dataset_id)}/files"
        for name, path in staged.items():
            self.store.location.move(path, f"{files_folder}/{name}")
        dataset = self.get(account, dataset_id).model_copy(  # read again: a PATCH may have come meanwhile
            update={"state": DatasetState.READY, "example_count": str(examples), "size_bytes": str(total),
                    "estimated_token_count": str(estimate_tokens(example_bytes)), "status": Status(),
                    "update_time": now()}
        )
        self.store.put_dataset(account, dataset_id, dataset)
        self.store.location.delete(self.store.dataset_uploads(account, dataset_id))
        self.store.location.delete(self._claimed(account, dataset_id))
        return dataset

    def download_files(self, account: str, dataset_id: str, lineage: bool) -> tuple[dict[str, str], bool]:
        """(file name → store-relative path, partial), for `:getDownloadEndpoint`. With
        lineage, the datasets this one came from too (its job's input, the parent job's
        output, its sourceDatasetId, ...), names prefixed with their dataset ID.

        `partial`: the dataset is the output of a job still being written; its files are
        then the parts committed so far (`committed_parts`), each a whole part whose
        every line is a final result, never to be rewritten."""
        chain = [self.get(account, dataset_id)]
        if chain[0].external_url:
            raise FailedPrecondition(f"dataset {dataset_id} is read in place from its externalUrl "
                                     f"{chain[0].external_url}; read it there")
        if lineage:
            seen = {chain[0].name}
            index = 0
            while index < len(chain):
                for related in self._sources(account, chain[index]):
                    if related.name not in seen:
                        seen.add(related.name)
                        chain.append(related)
                index += 1
        found = {}
        for dataset in chain:
            related_id = dataset.name.rsplit("/", 1)[-1]
            folder = f"{resource_name(account, DATASETS, related_id)}/files"
            if _being_written(dataset):
                files = self.committed_parts(folder)
            else:  # an externalUrl dataset in the lineage has no files here: none listed
                files = {name: f"{folder}/{name}" for name in self.store.location.list(folder) if FILENAME.fullmatch(name)}
            found.update({f"{related_id}-{name}" if lineage else name: path for name, path in files.items()})
        return found, _being_written(chain[0])

    def committed_parts(self, folder: str) -> dict[str, str]:
        """A running job's output so far: `results-<seq>.jsonl` and `errors-<seq>.jsonl`
        for each committed part (`output_layout`: a part counts once its commit record
        exists, and its data was written before the record)."""
        parts = {}
        for record in load_commits(Location(f"{self.store.root_url}/{folder}")):
            for kind, part in (("results", record.results_file), ("errors", record.errors_file)):
                if part:
                    parts[f"{kind}-{record.seq:08d}.jsonl"] = f"{folder}/{part}"
        return parts

    def _sources(self, account: str, dataset: Dataset) -> list[Dataset]:
        if dataset.source_dataset_id:
            _, source_id = parse_reference(dataset.source_dataset_id, DATASETS, account)
            source = self.store.get_dataset(account, source_id)
            return [source] if source is not None else []
        if not dataset.source_job_name:
            return []
        _, job_id = parse_reference(dataset.source_job_name, JOBS, account)
        record = self.store.get_job(account, job_id)
        if record is None:
            return []
        names = [record.job.input_dataset_id]
        if record.job.continued_from_job_name:
            _, parent_id = parse_reference(record.job.continued_from_job_name, JOBS, account)
            parent = self.store.get_job(account, parent_id)
            if parent is not None:
                names.append(parent.job.output_dataset_id)
        found = []
        for name in names:
            _, related_id = parse_reference(name, DATASETS, account)
            related = self.store.get_dataset(account, related_id)
            if related is not None:
                found.append(related)
        return found

