"""What `create_job` checks and writes besides the job's record: the fields a job gets
(a continuation inherits its parent's), the one live continuation per parent, and the
output dataset the job claims. The scheduler calls these; the last two under its lock.
"""

from __future__ import annotations

import uuid
from typing import Optional

from raybatch.config import ServiceConfig
from raybatch.exceptions import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from raybatch.jobs.model_access import model_refusal
from raybatch.jobs.run_config import RunConfigBuilder
from raybatch.resources import (
    DATASETS,
    JOBS,
    CreateJobRequest,
    Dataset,
    DatasetState,
    JobRecord,
    JobRuntime,
    JobState,
    now,
    parse_reference,
    resource_name,
)
from raybatch.store import Store


def job_fields(
    store: Store, config: ServiceConfig, configs: RunConfigBuilder, account: str, request: CreateJobRequest
) -> tuple[dict, JobRuntime]:
    """The new job's fields and runtime, checked: a model it may use, an input dataset of
    its own account, and for a continuation an ended parent on the same input."""
    runtime = JobRuntime(account=account)
    fields = request.model_dump(exclude_none=True)
    parent = None
    if request.continued_from_job_name:
        parent = _continuation_parent(store, account, request.continued_from_job_name)
        runtime.skip_succeeded_in = parent.runtime.skip_succeeded_in + [configs.files_url(parent.job.output_dataset_id)]
        inherited = {
            "model": parent.job.model,
            "input_dataset_id": parent.job.input_dataset_id,
            "inference_parameters": parent.job.inference_parameters,
            "precision": parent.job.precision,
        }
        fields = {**inherited, **fields, "continued_from_job_name": parent.job.name}
    if not fields.get("model") or not fields.get("input_dataset_id"):
        raise InvalidArgument("model and inputDatasetId are required unless continuedFromJobName is set")
    # Before any record is written; a continuation's inherited model is checked too,
    # against today's catalog and allowlist, not those its parent was created under.
    refusal = model_refusal(config, account, fields["model"])
    if refusal:
        raise InvalidArgument(refusal)
    input_account, input_id = parse_reference(fields["input_dataset_id"], DATASETS, account)
    if input_account != account or store.get_dataset(account, input_id) is None:
        raise NotFound(f"dataset {fields['input_dataset_id']} not found")
    fields["input_dataset_id"] = resource_name(account, DATASETS, input_id)
    if parent and fields["input_dataset_id"] != parent.job.input_dataset_id:
        raise InvalidArgument(
            "a continuation runs on its parent's input dataset "
            f"({parent.job.input_dataset_id}); line numbers of another input do not match"
        )
    return fields, runtime


def _continuation_parent(store: Store, account: str, name: str) -> JobRecord:
    parent_account, parent_id = parse_reference(name, JOBS, account)
    parent = store.get_job(account, parent_id) if parent_account == account else None
    if parent is None:
        raise NotFound(f"batch inference job {name} not found")
    if not parent.job.state.terminal:
        raise FailedPrecondition(f"job {name} is {parent.job.state.value}; continue it once it has ended")
    return parent


def refuse_second_continuation(store: Store, account: str, parent_name: str) -> None:
    """One live continuation per parent (the caller holds the scheduler's lock): two
    would each run the parent's unfinished lines, answering them twice. A FAILED one does
    not count; it ran nothing."""
    for record in store.list_jobs(account):
        if record.job.continued_from_job_name == parent_name and record.job.state != JobState.FAILED:
            raise AlreadyExists(f"{parent_name} is already continued by {record.job.name}; continue that job instead")


def claim_output_dataset(store: Store, account: str, job_id: str, requested: Optional[str]) -> str:
    """Create the job's output dataset (UPLOADING until the job publishes); its ID."""
    if requested:
        output_account, output_id = parse_reference(requested, DATASETS, account)
        if output_account != account:
            raise NotFound(f"dataset {requested} not found")
        if store.get_dataset(account, output_id) is not None:
            raise AlreadyExists(f"output dataset {output_id} already exists; name a new one")
    else:
        output_id = f"{job_id}-output"[:63]
        if store.get_dataset(account, output_id) is not None:
            output_id = f"output-{uuid.uuid4().hex[:12]}"
    time_now = now()
    store.put_dataset(
        account,
        output_id,
        Dataset(
            name=resource_name(account, DATASETS, output_id),
            display_name=f"Output of {job_id}",
            create_time=time_now,
            update_time=time_now,
            state=DatasetState.UPLOADING,
            source_job_name=resource_name(account, JOBS, job_id),
        ),
    )
    return output_id
