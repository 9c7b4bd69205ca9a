"""firectl's spellings of the resource commands: what each parses to and the exact
request it sends (httpx.MockTransport, no service); both spellings of a command send
the same request."""

from __future__ import annotations

import json

import httpx
import pytest

from raybatch.cli import app, connection
from raybatch.cli.exit_codes import ExitCode
from raybatch.client import RaybatchClient

PREFIX = "/v1/accounts/acme/"
JOB = {"name": "accounts/acme/batchInferenceJobs/j", "state": "JOB_STATE_VALIDATING"}
READY = {"name": "accounts/acme/datasets/d", "state": "READY", "exampleCount": "1"}


class Recorder:
    """Answers every request with `answer` and records "METHOD path", query and body."""

    def __init__(self, answer: dict | None = None):
        self.answer = answer or {}
        self.sent: list[tuple[str, dict, object]] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        request.read()
        route = f"{request.method} {request.url.path.removeprefix(PREFIX)}"
        content = json.loads(request.content) if request.headers.get("content-type") == "application/json" else None
        self.sent.append((route, dict(request.url.params), content))
        return httpx.Response(200, json=self.answer)

    @property
    def routes(self) -> list[str]:
        return [route for route, _, _ in self.sent]


def run(monkeypatch, argv: list[str], recorder: Recorder) -> int:
    client = RaybatchClient("http://api.test", "key", "acme", transport=httpx.MockTransport(recorder))
    monkeypatch.setattr(connection, "client_factory", lambda args: client)
    return app.main(argv)


FIRECTL_CREATE = [
    "create", "batch-inference-job", "-m", "accounts/fireworks/models/llama-v3p1-8b-instruct",
    "-d", "in", "-x", "out", "--job-id", "j", "--display-name", "My job",
    "--max-tokens", "1024", "--temperature", "0.7", "--top-p", "0.9", "--top-k", "50", "--n", "2",
    "--precision", "FP16", "--extra-body", '{"stop": ["\\n"]}',
]
EXPECTED_BODY = {
    "model": "accounts/fireworks/models/llama-v3p1-8b-instruct",
    "inputDatasetId": "in",
    "outputDatasetId": "out",
    "displayName": "My job",
    "inferenceParameters": {
        "maxTokens": 1024, "temperature": 0.7, "topP": 0.9, "topK": 50, "n": 2, "extraBody": '{"stop": ["\\n"]}',
    },
    "precision": "FP16",
}


def test_firectls_create_batch_inference_job_sends_the_apis_body(monkeypatch, capsys):
    recorder = Recorder(JOB)
    assert run(monkeypatch, FIRECTL_CREATE, recorder) == ExitCode.OK
    assert recorder.sent == [("POST batchInferenceJobs", {"batchInferenceJobId": "j"}, EXPECTED_BODY)]
    assert json.loads(capsys.readouterr().out) == JOB


@pytest.mark.parametrize("spelling", [
    ["job", "create"], ["batch-inference-job", "create"], ["create", "batch-inference-job"], ["create", "job"],
])
def test_every_spelling_of_create_sends_the_same_request(monkeypatch, spelling):
    long_flags = [
        "--model", "m", "--input-dataset-id", "in", "--output-dataset-id", "out",
        "--max-tokens", "8", "--top-p", "0.5", "--continued-from", "accounts/acme/batchInferenceJobs/old",
    ]
    short_flags = ["-m", "m", "-d", "in", "-x", "out", "--max-tokens", "8", "--top-p", "0.5", "--continue-from",
                   "accounts/acme/batchInferenceJobs/old"]
    sent = []
    for flags in (long_flags, short_flags):
        recorder = Recorder(JOB)
        assert run(monkeypatch, [*spelling, *flags], recorder) == ExitCode.OK
        sent.append(recorder.sent)
    assert sent[0] == sent[1] == [("POST batchInferenceJobs", {}, {
        "model": "m", "inputDatasetId": "in", "outputDatasetId": "out",
        "inferenceParameters": {"maxTokens": 8, "topP": 0.5},
        "continuedFromJobName": "accounts/acme/batchInferenceJobs/old",
    })]


def test_continue_from_alone_sends_no_model_or_input(monkeypatch):
    recorder = Recorder(JOB)
    assert run(monkeypatch, ["create", "batch-inference-job", "--continue-from", "old"], recorder) == ExitCode.OK
    assert recorder.sent == [("POST batchInferenceJobs", {}, {"continuedFromJobName": "old"})]


@pytest.mark.parametrize("flag,value", [
    ("--temperature", "nan"), ("--top-p", "1.5"), ("--max-tokens", "-1"), ("--extra-body", "[1]"),
    ("--extra-body", "{not json"),
])
def test_a_sampling_value_the_api_would_refuse_exits_2_before_any_request(monkeypatch, capsys, flag, value):
    recorder = Recorder(JOB)
    assert run(monkeypatch, ["create", "batch-inference-job", "-m", "m", "-d", "in", flag, value], recorder) == 2
    assert recorder.sent == []
    assert "error:" in capsys.readouterr().err


@pytest.mark.parametrize("argv,route", [
    (["get", "batch-inference-job", "j"], "GET batchInferenceJobs/j"),
    (["get", "batch-inference-job", "accounts/acme/batchInferenceJobs/j"], "GET batchInferenceJobs/j"),
    (["delete", "batch-inference-job", "j"], "DELETE batchInferenceJobs/j"),
    (["list", "batch-inference-jobs"], "GET batchInferenceJobs"),
    (["list", "batch-inference-job"], "GET batchInferenceJobs"),
    (["get", "dataset", "d"], "GET datasets/d"),
    (["delete", "dataset", "d"], "DELETE datasets/d"),
    (["list", "datasets"], "GET datasets"),
    (["list", "dataset"], "GET datasets"),
])
def test_get_list_delete_reach_their_routes(monkeypatch, argv, route):
    recorder = Recorder()
    assert run(monkeypatch, argv, recorder) == ExitCode.OK
    assert recorder.routes == [route]


def test_list_passes_filter_order_and_page_size(monkeypatch):
    recorder = Recorder()
    argv = ["list", "datasets", "--filter", 'state="READY"', "--order-by", "createTime desc", "--page-size", "5"]
    assert run(monkeypatch, argv, recorder) == ExitCode.OK
    assert recorder.sent[0][1] == {"filter": 'state="READY"', "orderBy": "createTime desc", "pageSize": "5"}


def test_create_dataset_name_file_uploads_the_file(monkeypatch, tmp_path, capsys):
    (tmp_path / "in.jsonl").write_text('{"custom_id": "a", "body": {"messages": []}}\n')
    recorder = Recorder(READY)
    assert run(monkeypatch, ["create", "dataset", "d", str(tmp_path / "in.jsonl")], recorder) == ExitCode.OK
    assert recorder.routes == ["POST datasets", "POST datasets/d:upload", "GET datasets/d"]
    assert recorder.sent[0][2] == {"datasetId": "d", "dataset": {"userUploaded": {}}}
    assert json.loads(capsys.readouterr().out)["state"] == "READY"


@pytest.mark.parametrize("argv", [["IN", "--file", "IN"], ["MISSING"]])
def test_create_dataset_refuses_a_bad_file_before_any_request(monkeypatch, tmp_path, argv):
    (tmp_path / "in.jsonl").write_text("{}\n")
    files = {"IN": str(tmp_path / "in.jsonl"), "MISSING": str(tmp_path / "missing.jsonl")}
    recorder = Recorder(READY)
    assert run(monkeypatch, ["create", "dataset", "d", *(files[a] if a in files else a for a in argv)], recorder) == 2
    assert recorder.sent == []


def test_download_dataset_follows_firectls_defaults(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    signed = {"filenameToSignedUrls": {"results.jsonl": "https://bucket.test/r"}}
    recorder = Recorder(signed)
    assert run(monkeypatch, ["download", "dataset", "out", "--download-lineage"], recorder) == ExitCode.OK
    assert recorder.sent[0][:2] == ("GET datasets/out:getDownloadEndpoint", {"downloadLineage": "true"})
    assert (tmp_path / "results.jsonl").exists()  # firectl's --output-dir defaults to "."
    assert run(monkeypatch, ["dataset", "download", "out"], Recorder(signed)) == ExitCode.OK
    assert (tmp_path / "out" / "results.jsonl").exists()  # raybatch's own form: ./ID


@pytest.mark.parametrize("flag", ["-a", "--account-id", "--account"])
def test_firectls_account_flag_names_the_account(flag):
    args = app.build_parser().parse_args(["get", "batch-inference-job", "j", flag, "other"])
    assert args.account == "other"
