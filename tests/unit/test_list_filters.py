"""Issue 12, lists: AIP-160 filters and multi-field orderBy over job and dataset records."""

from __future__ import annotations

from datetime import datetime, timezone

import pytest

from raybatch.api.listing import DATASET_FIELDS, JOB_FIELDS, listed
from raybatch.exceptions import InvalidArgument
from raybatch.resources import BatchInferenceJob, Dataset, DatasetState, JobState


def job(job_id: str, state: str, day: int, display: str = None, model: str = "tiny", input_id: str = "in") -> BatchInferenceJob:
    return BatchInferenceJob(
        name=f"accounts/a/batchInferenceJobs/{job_id}", state=JobState(state), display_name=display, model=model,
        create_time=datetime(2025, 1, day, tzinfo=timezone.utc), input_dataset_id=f"accounts/a/datasets/{input_id}",
    )


JOBS = [
    job("j1", "JOB_STATE_COMPLETED", 1, "alpha run", input_id="in"),
    job("j2", "JOB_STATE_FAILED", 2, "beta", model="accounts/fireworks/models/deepseek-v3", input_id="other"),
    job("j3", "JOB_STATE_RUNNING", 3, None),
    job("j4", "JOB_STATE_COMPLETED", 4, "alpha again", model="accounts/fireworks/models/deepseek-v3"),
]


def ids(records) -> list[str]:
    return [r.name.rsplit("/", 1)[-1] for r in records]


@pytest.mark.parametrize("text, expected", [
    ("state=JOB_STATE_COMPLETED", ["j1", "j4"]),
    ('state = "JOB_STATE_FAILED" OR state = "JOB_STATE_COMPLETED"', ["j1", "j2", "j4"]),
    ("state=COMPLETED", ["j1", "j4"]),  # the enum's prefix may be left out
    ("state!=JOB_STATE_COMPLETED", ["j2", "j3"]),
    ('createTime > "2025-01-02T00:00:00Z"', ["j3", "j4"]),
    ("createTime<2025-01-02T00:00:00Z", ["j1"]),
    ("create_time >= 2025-01-02T00:00:00+00:00 AND create_time <= 2025-01-03T00:00:00Z", ["j2", "j3"]),
    ('displayName:"alpha"', ["j1", "j4"]),
    ('displayName="alpha*"', ["j1", "j4"]),
    ("displayName:*", ["j1", "j2", "j4"]),
    ("NOT displayName:*", ["j3"]),
    ('model="accounts/fireworks/models/deepseek-v3"', ["j2", "j4"]),
    ("inputDatasetId=other", ["j2"]),  # a bare ID matches the reference's last segment
    ("inputDatasetId=accounts/a/datasets/in", ["j1", "j3", "j4"]),
    ("state=JOB_STATE_COMPLETED AND NOT (displayName:again OR model:deepseek)", ["j1"]),
    ("-state=JOB_STATE_COMPLETED", ["j2", "j3"]),
    # AIP-160: OR binds tighter than AND.
    ("state=JOB_STATE_RUNNING AND state=JOB_STATE_COMPLETED OR displayName:beta", []),
    ("(state=JOB_STATE_RUNNING AND state=JOB_STATE_COMPLETED) OR displayName:beta", ["j2"]),
    # Juxtaposition is AND.
    ("state=JOB_STATE_COMPLETED displayName:again", ["j4"]),
    # A state Fireworks defines that raybatch never reaches: valid, matches nothing.
    ("state=JOB_STATE_PAUSED", []),
    ("state=JOB_STATE_CREATING OR state=JOB_STATE_RUNNING", ["j3"]),
    ("", ["j1", "j2", "j3", "j4"]),
])
def test_job_filters(text, expected):
    assert ids(listed(JOBS, text, None, JOB_FIELDS)) == expected


@pytest.mark.parametrize("text, complaint", [
    ("state=JOB_STATE_BOGUS", "'JOB_STATE_BOGUS' is not a state"),
    ("color=red", "unknown field 'color'"),
    ("state>JOB_STATE_RUNNING", "state takes = and != only"),
    ("createTime>yesterday", "is not an RFC 3339 time"),
    ("(state=JOB_STATE_RUNNING", "it ends too early"),
    ("state=JOB_STATE_RUNNING)", "unexpected ')'"),
    ("state", "needs a comparison"), ("running", "unknown field"),
    ("state=", "it ends too early"),
    ('displayName="x" AND', "it ends too early"),
    ("model.name=x", "unknown field 'model.name'"),
])
def test_an_unsupported_filter_is_a_400_that_says_what_is_supported(text, complaint):
    with pytest.raises(InvalidArgument) as raised:
        listed(JOBS, text, None, JOB_FIELDS)
    assert complaint in raised.value.message
    assert "with =, !=, <, <=, >, >=, : (has), combined with AND, OR, NOT and parentheses" in raised.value.message
    assert "state, model, inputDatasetId" in raised.value.message


@pytest.mark.parametrize("text, expected", [
    (None, ["j1", "j2", "j3", "j4"]),
    ("createTime desc", ["j4", "j3", "j2", "j1"]),
    ("create_time DESC", ["j4", "j3", "j2", "j1"]),
    ("created_time", ["j1", "j2", "j3", "j4"]),
    ("state, createTime desc", ["j4", "j1", "j2", "j3"]),
    ("model Desc,displayName asc", ["j3", "j1", "j4", "j2"]),  # a missing displayName first
])
def test_order_by_several_fields_in_any_case(text, expected):
    assert ids(listed(JOBS, None, text, JOB_FIELDS)) == expected


@pytest.mark.parametrize("text", ["colour", "createTime sideways", "createTime desc extra", "createTime,,state"])
def test_an_unsupported_order_is_a_400(text):
    with pytest.raises(InvalidArgument, match="unsupported orderBy"):
        listed(JOBS, None, text, JOB_FIELDS)


def test_dataset_filters_and_order():
    datasets = [
        Dataset(name=f"accounts/a/datasets/d{n}", state=state, display_name=f"set {n}",
                create_time=datetime(2025, 2, n, tzinfo=timezone.utc))
        for n, state in ((1, DatasetState.READY), (2, DatasetState.UPLOADING), (3, DatasetState.READY))
    ]
    assert ids(listed(datasets, "state=READY", "createTime desc", DATASET_FIELDS)) == ["d3", "d1"]
    assert ids(listed(datasets, "state=STATE_UNSPECIFIED", None, DATASET_FIELDS)) == []
    assert ids(listed(datasets, 'name="d2" OR displayName="set 3"', "name desc", DATASET_FIELDS)) == ["d3", "d2"]
    with pytest.raises(InvalidArgument, match="unknown field 'model'"):
        listed(datasets, "model=x", None, DATASET_FIELDS)
