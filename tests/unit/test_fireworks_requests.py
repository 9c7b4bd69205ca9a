"""Issue 12, requests Fireworks takes: the pure parts (body normalisation, readMask,
query parameters in both spellings, upload file names). The same requests go through the
running service in tests/integration/test_api_conformance.py."""

from __future__ import annotations

import pytest
from starlette.requests import Request

from raybatch.api.datasets import upload_filename
from raybatch.api.field_mask import apply_mask, mask_paths
from raybatch.api.query import query_params
from raybatch.exceptions import InvalidArgument
from raybatch.protocol import InferenceParameters
from raybatch.resources import BatchInferenceJob, CreateJobRequest, DatasetFields, FileUrls


def test_proto3_zero_values_in_inference_parameters_mean_unset():
    params = InferenceParameters.model_validate(
        {"maxTokens": 0, "n": 0, "topP": 0, "topK": 0, "extraBody": "", "temperature": 0})
    assert params == InferenceParameters(temperature=0)  # temperature 0 is greedy, kept
    assert params.row_defaults() == {"temperature": 0}
    assert InferenceParameters.model_validate({"top_p": 0.0, "max_tokens": 5}).max_tokens == 5
    with pytest.raises(ValueError):
        InferenceParameters.model_validate({"maxTokens": -1})  # not a zero: still refused


def test_a_job_fetched_with_get_can_be_posted_back_as_a_template():
    fetched = BatchInferenceJob(
        name="accounts/a/batchInferenceJobs/j", state="JOB_STATE_COMPLETED", model="tiny",
        input_dataset_id="accounts/a/datasets/in", display_name="run 1",
    ).model_dump(mode="json", by_alias=True)
    fetched.pop("outputDatasetId", None)
    request = CreateJobRequest.model_validate(fetched)
    assert request.model == "tiny" and request.display_name == "run 1" and request.input_dataset_id.endswith("/in")
    with pytest.raises(ValueError, match="estimatedCost"):
        CreateJobRequest.model_validate({**fetched, "estimatedCost": 1})  # other unknown fields: still 400


@pytest.mark.parametrize("given, stored", [(12, "12"), ("12", "12"), (None, None)])
def test_example_count_is_taken_as_a_json_number_or_string(given, stored):
    assert DatasetFields.model_validate({"exampleCount": given}).example_count == stored


@pytest.mark.parametrize("given", [True, "twelve", -3])
def test_example_count_must_be_a_count(given):
    with pytest.raises(ValueError):
        DatasetFields.model_validate({"exampleCount": given})


def test_read_mask_keeps_the_named_fields_in_either_spelling():
    body = {"name": "n", "state": "S", "jobProgress": {"percent": 5, "outputRows": 2}, "model": "m"}
    assert apply_mask(body, mask_paths("name, job_progress.percent", BatchInferenceJob)) == {
        "name": "n", "jobProgress": {"percent": 5}}
    assert apply_mask(body, mask_paths("*", BatchInferenceJob)) is body
    assert apply_mask(body, mask_paths("", BatchInferenceJob)) is body
    assert apply_mask({"filenameToSignedUrls": {"a": "u"}}, mask_paths("filename_to_signed_urls", FileUrls)) == {
        "filenameToSignedUrls": {"a": "u"}}
    with pytest.raises(InvalidArgument, match="'colour' is not a field"):
        mask_paths("name,colour", BatchInferenceJob)


def _request(query: str) -> Request:
    return Request({"type": "http", "method": "GET", "path": "/", "query_string": query.encode(), "headers": []})


def test_query_parameters_in_camel_or_snake_case():
    spec = {"pageSize": int, "pageToken": str, "downloadLineage": bool, "batchInferenceJobId": str}
    assert query_params(_request("page_size=5&download_lineage=true&batch_inference_job_id=j"), **spec) == {
        "pageSize": 5, "pageToken": None, "downloadLineage": True, "batchInferenceJobId": "j"}
    assert query_params(_request("pageSize=5&downloadLineage=0"), **spec)["downloadLineage"] is False


@pytest.mark.parametrize("query, complaint", [
    ("page_sise=5", "unknown query parameter 'page_sise'; this route takes pageSize, readMask"),
    ("pageSize=5&page_size=6", "given twice"),
    ("pageSize=lots", "must be an integer"),
    ("readMask=a&readMask=b", "given twice"),
])
def test_a_query_parameter_is_never_silently_ignored(query, complaint):
    with pytest.raises(InvalidArgument, match=complaint):
        query_params(_request(query), pageSize=int, readMask=str)


@pytest.mark.parametrize("given, stored", [
    ("in.jsonl", "in.jsonl"), ("", "upload.jsonl"), ("upload", "upload.jsonl"), ("data.json", "data.json.jsonl"),
    ("../../etc/passwd", "passwd.jsonl"), ("C:\\Users\\me\\my file.txt", "my-file.txt.jsonl"), (".hidden", "hidden.jsonl"),
    ("x.tmp-1.jsonl", "x-1.jsonl"),
])
def test_upload_file_names_are_stored_under_a_safe_name(given, stored):
    assert upload_filename(given) == stored
