"""Wire models of the REST resources: datasets and batch inference jobs, as Fireworks'
API and its official SDK (`fireworks-ai`) shape them. JSON names are camelCase.

The line formats of the files themselves live in `protocol`.
"""

from __future__ import annotations

import enum
import re
from datetime import datetime, timezone
from typing import Any, Optional

from typing import Annotated

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator, model_validator
from pydantic.alias_generators import to_snake as _snake

from raybatch.exceptions import InvalidArgument
from raybatch.protocol import CamelModel, InferenceParameters, JobProgress, Precision

# 1-63 characters: lowercase letters, digits, hyphens; a letter first. Checked before
# an ID takes part in any storage path, so `../x` can never reach the store.
ID_PATTERN = re.compile(r"[a-z][a-z0-9-]{0,62}")
DATASETS = "datasets"
JOBS = "batchInferenceJobs"


def check_id(value: str, what: str = "ID") -> str:
    if not isinstance(value, str) or not ID_PATTERN.fullmatch(value):
        raise InvalidArgument(
            f"invalid {what} {value!r}: use 1-63 lowercase letters, digits and hyphens, "
            "starting with a letter"
        )
    return value


def resource_name(account: str, collection: str, resource_id: str) -> str:
    return f"accounts/{account}/{collection}/{resource_id}"


def parse_reference(value: str, collection: str, account: str) -> tuple[str, str]:
    """A bare ID or a full name `accounts/{a}/{collection}/{id}` → (account, id), both
    checked. A bare ID belongs to the caller's account."""
    parts = value.split("/") if isinstance(value, str) else []
    if len(parts) == 1:
        return account, check_id(parts[0], f"{collection} ID")
    if len(parts) == 4 and parts[0] == "accounts" and parts[2] == collection:
        return check_id(parts[1], "account ID"), check_id(parts[3], f"{collection} ID")
    raise InvalidArgument(f"{value!r} is neither an ID nor a name accounts/{{account}}/{collection}/{{id}}")


def now() -> datetime:
    return datetime.now(timezone.utc)


class Status(BaseModel):
    code: str = "OK"  # google.rpc code name
    message: str = ""


class DatasetState(str, enum.Enum):
    UPLOADING = "UPLOADING"  # created; files may be uploaded, not usable as input yet
    READY = "READY"  # validated (or written by a finished job); files do not change


class DatasetFormat(str, enum.Enum):
    """The fireworks-ai SDK's `Dataset.format`. Kept and returned; a job reads every
    dataset's lines the same way (each line says its own url)."""

    FORMAT_UNSPECIFIED = "FORMAT_UNSPECIFIED"
    CHAT = "CHAT"
    COMPLETION = "COMPLETION"
    RL = "RL"


class Dataset(CamelModel):
    name: str = ""
    display_name: Optional[str] = None
    create_time: Optional[datetime] = None
    update_time: Optional[datetime] = None
    created_by: Optional[str] = None
    state: DatasetState = DatasetState.UPLOADING
    status: Status = Field(default_factory=Status)
    example_count: Optional[str] = None  # int64 as a string, as proto JSON writes it
    # bytes/4 of the examples, set at validation (api/datasets.py TOKEN_ESTIMATE_BYTES).
    estimated_token_count: Optional[str] = None
    format: DatasetFormat = DatasetFormat.FORMAT_UNSPECIFIED
    user_uploaded: Optional[dict[str, Any]] = None
    # Read in place by jobs, never copied (api/external_urls.py says what may be named).
    external_url: Optional[str] = None
    source_dataset_id: Optional[str] = None  # as given at create; lineage only
    source_job_name: Optional[str] = None
    # Ours: bytes stored, checked against the dataset size limit.
    size_bytes: str = "0"


def _int64_as_string(value: Any) -> Any:
    """protojson writes an int64 as a string and reads either: `"12"` or `12`."""
    return str(value) if isinstance(value, int) and not isinstance(value, bool) else value


class DatasetFields(CamelModel):
    """What a client may set on create or PATCH; anything else is ignored."""

    model_config = ConfigDict(extra="ignore")

    display_name: Optional[str] = Field(None, max_length=512)
    example_count: Annotated[Optional[str], BeforeValidator(_int64_as_string)] = Field(None, pattern=r"^\d{1,19}$")
    format: Optional[DatasetFormat] = None
    user_uploaded: Optional[dict[str, Any]] = None


class NewDatasetFields(DatasetFields):
    """What a client may set on create only: where the files are, and its own token
    estimate (validation replaces it with the service's)."""

    external_url: Optional[str] = None
    estimated_token_count: Annotated[Optional[str], BeforeValidator(_int64_as_string)] = Field(
        None, pattern=r"^\d{1,19}$")


class CreateDatasetRequest(CamelModel):
    model_config = ConfigDict(extra="ignore")

    dataset_id: str
    dataset: NewDatasetFields = Field(default_factory=NewDatasetFields)
    source_dataset_id: Optional[str] = None


class ListDatasetsResponse(CamelModel):
    datasets: list[Dataset]
    next_page_token: str = ""
    total_size: int


class FileUrls(CamelModel):
    """`:getUploadEndpoint` request (`filenameToSize`, and the `readMask` the SDK sends
    in it) and both endpoints' answer."""

    filename_to_size: Optional[dict[str, int]] = None
    filename_to_signed_urls: Optional[dict[str, str]] = None
    read_mask: Optional[str] = None
    # Ours: the output of a job still running, its parts committed so far.
    partial: Optional[bool] = None


class JobState(str, enum.Enum):
    VALIDATING = "JOB_STATE_VALIDATING"  # checking input dataset, model and precision
    PENDING = "JOB_STATE_PENDING"  # valid; waiting for a free running slot
    RUNNING = "JOB_STATE_RUNNING"  # its pipeline driver is running
    WRITING_RESULTS = "JOB_STATE_WRITING_RESULTS"  # every line committed; publishing files
    COMPLETED = "JOB_STATE_COMPLETED"  # every line in results or errors (terminal)
    EXPIRED = "JOB_STATE_EXPIRED"  # time limit or output cap; partial results kept (terminal)
    RE_QUEUEING = "JOB_STATE_RE_QUEUEING"  # its driver or cluster died; will resume
    CANCELLING = "JOB_STATE_CANCELLING"  # cancel asked; stopping the driver
    CANCELLED = "JOB_STATE_CANCELLED"  # stopped by request; partial results kept (terminal)
    FAILED = "JOB_STATE_FAILED"  # cannot go on; status.message says why (terminal)

    @property
    def terminal(self) -> bool:
        return self in TERMINAL_STATES


TERMINAL_STATES = frozenset({JobState.COMPLETED, JobState.EXPIRED, JobState.CANCELLED, JobState.FAILED})


class BatchInferenceJob(CamelModel):
    name: str = ""
    display_name: Optional[str] = None
    create_time: Optional[datetime] = None
    update_time: Optional[datetime] = None
    created_by: Optional[str] = None
    state: JobState = JobState.VALIDATING
    status: Status = Field(default_factory=Status)
    model: Optional[str] = None
    input_dataset_id: Optional[str] = None
    output_dataset_id: Optional[str] = None
    inference_parameters: InferenceParameters = Field(default_factory=InferenceParameters)
    precision: Precision = Precision.PRECISION_UNSPECIFIED
    job_progress: JobProgress = Field(default_factory=JobProgress)
    continued_from_job_name: Optional[str] = None
    # Ours: the job's time limit as a proto Duration string ("3600s"); None = the
    # service's limit. It can only shorten the service's limit.
    max_duration: Optional[str] = None


# Fields of a job that only the service sets. A create body that carries them (a job
# fetched with GET and posted back as a template) has them dropped, as Fireworks'
# gateway does; any other unknown field is still a 400.
OUTPUT_ONLY_JOB_FIELDS = frozenset({"name", "state", "status", "createTime", "updateTime", "createdBy", "jobProgress"})


class CreateJobRequest(CamelModel):
    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _drop_output_only(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        output_only = OUTPUT_ONLY_JOB_FIELDS | {_snake(name) for name in OUTPUT_ONLY_JOB_FIELDS}
        return {key: value for key, value in data.items() if key not in output_only}

    display_name: Optional[str] = Field(None, max_length=512)
    model: Optional[str] = Field(None, min_length=1, max_length=1024)
    input_dataset_id: Optional[str] = None
    output_dataset_id: Optional[str] = None
    inference_parameters: Optional[InferenceParameters] = None
    precision: Optional[Precision] = None
    continued_from_job_name: Optional[str] = None
    max_duration: Optional[str] = None

    @field_validator("max_duration")
    @classmethod
    def _duration(cls, value: Optional[str]) -> Optional[str]:
        if value is not None:
            duration_seconds(value)
        return value


def duration_seconds(value: str) -> float:
    match = re.fullmatch(r"(\d+(?:\.\d+)?)s", value or "")
    if not match or float(match.group(1)) <= 0:
        raise ValueError(f"duration {value!r} must look like '3600s' and be positive")
    return float(match.group(1))


class ListJobsResponse(CamelModel):
    batch_inference_jobs: list[BatchInferenceJob]
    next_page_token: str = ""
    total_size: int


class JobRuntime(BaseModel):
    """Scheduler bookkeeping kept beside a job record, never sent to clients."""

    account: str
    attempts: int = 0  # drivers started so far; more than one means it resumed
    driver_id: Optional[str] = None  # Ray Job submission ID of the running driver
    running_since: Optional[datetime] = None  # first RUNNING: the time limit counts from here
    stop_reason: Optional[str] = None  # why the driver is being stopped: cancel | expire
    # Deleted while it had not ended: hidden from the API at once, the record goes
    # when the job reaches a terminal state (its driver takes seconds to stop).
    delete_requested: bool = False
    skip_succeeded_in: list[str] = Field(
        default_factory=list, description="Output folders of the parent chain whose "
        "successful lines a continuation skips."
    )


class JobRecord(BaseModel):
    """What the store keeps for a job: the public resource and the private runtime."""

    job: BatchInferenceJob
    runtime: JobRuntime


class ApiKeyRecord(BaseModel):
    """A stored API key: only the SHA-256 of its secret, never the key."""

    key_id: str
    account: str
    secret_sha256: str
    create_time: datetime
    revoked: bool = False
