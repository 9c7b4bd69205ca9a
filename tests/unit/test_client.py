"""RaybatchClient and the `dataset`/`job` commands against httpx.MockTransport: the
exact requests sent, the key never sent to a signed URL, errors, pagination, and the
commands' exit codes."""

from __future__ import annotations

import json
from urllib.parse import parse_qs

import httpx
import pytest

from raybatch.cli import app, connection, datasets
from raybatch.client import RaybatchClient
from raybatch.exceptions import ApiRequestError, ConfigError

PREFIX = "/v1/accounts/acme/"
SIGNED = "https://bucket.s3.test"  # signed URLs live on another host
JOB_NAME = "accounts/acme/batchInferenceJobs/j"
RUNNING, COMPLETED = "JOB_STATE_RUNNING", "JOB_STATE_COMPLETED"
NOT_FOUND = {"error": {"code": 404, "message": "no route", "status": "NOT_FOUND"}}


class FakeServer:
    """Routes "METHOD path" (API paths relative to the account, signed ones from "/")
    to a response or a callable; records every request and its route in `calls`."""

    def __init__(self, routes: dict):
        self.routes = routes
        self.requests: list[httpx.Request] = []
        self.calls: list[str] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        request.read()
        route = f"{request.method} {request.url.path.removeprefix(PREFIX)}"
        self.requests.append(request)
        self.calls.append(route)
        answer = self.routes.get(route, httpx.Response(404, json=NOT_FOUND))
        if callable(answer):
            return answer(request)
        answer.read()  # a fresh copy each time: a route may be asked more than once
        return httpx.Response(answer.status_code, headers=answer.headers, content=answer.content)

    def client(self) -> RaybatchClient:
        return RaybatchClient("http://api.test", "secret-key", "acme", transport=httpx.MockTransport(self))


def ok(body) -> httpx.Response:
    return httpx.Response(200, json=body)


def query(request: httpx.Request) -> dict:
    return {k: v[0] for k, v in parse_qs(request.url.query.decode()).items()}


def body(request: httpx.Request) -> dict:
    return json.loads(request.content)


def has_key(request: httpx.Request) -> bool:
    """Whether the request carries the API key; and only requests to the API host may."""
    assert request.url.host == ("api.test" if request.headers.get("authorization") else "bucket.s3.test")
    return request.headers.get("authorization") == "Bearer secret-key"


def job_sequence(*states: str, progress: dict | None = None):
    """Job j in each of `states` in turn, then in the last one for ever."""
    remaining = list(states)

    def answer(request: httpx.Request) -> httpx.Response:
        state = remaining.pop(0) if len(remaining) > 1 else remaining[0]
        return ok({"name": JOB_NAME, "state": state, "jobProgress": progress or {}})

    return answer


def run_cli(monkeypatch, server: FakeServer | None, argv: list[str]) -> int:
    if server is not None:
        monkeypatch.setattr(connection, "client_factory", lambda args: server.client())
    return app.main(argv)


@pytest.fixture(autouse=True)
def _no_sleep(monkeypatch):
    monkeypatch.setattr("raybatch.client.time.sleep", lambda seconds: None)


# ------------------------------------------------------------------ settings, errors


def test_missing_key_or_account_is_a_config_error_and_exit_2(monkeypatch, capsys):
    monkeypatch.delenv("RAYBATCH_API_KEY", raising=False)
    monkeypatch.delenv("RAYBATCH_ACCOUNT", raising=False)
    with pytest.raises(ConfigError, match="API key"):
        RaybatchClient(account="acme")
    with pytest.raises(ConfigError, match="account"):
        RaybatchClient(api_key="k")
    assert run_cli(monkeypatch, None, ["job", "list", "--account", "acme"]) == 2
    assert "API key" in capsys.readouterr().err


def test_settings_default_from_the_environment(monkeypatch):
    monkeypatch.delenv("RAYBATCH_BASE_URL", raising=False)
    monkeypatch.setenv("RAYBATCH_API_KEY", "env-key")
    monkeypatch.setenv("RAYBATCH_ACCOUNT", "env-account")
    with RaybatchClient() as client:
        assert (client.base_url, client.account) == ("http://127.0.0.1:8000", "env-account")
        assert client._api.headers["authorization"] == "Bearer env-key"


@pytest.mark.parametrize(
    "response,fields",
    [
        (httpx.Response(404, json=NOT_FOUND), (404, "NOT_FOUND", "no route")),
        (httpx.Response(502, text="<html>bad gateway</html>"), (502, "BAD_GATEWAY", "<html>bad gateway</html>")),
    ],
)
def test_errors_become_api_request_error(response, fields):
    with FakeServer({"GET datasets/d": response}).client() as client, pytest.raises(ApiRequestError) as caught:
        client.get_dataset("d")
    assert (caught.value.http_status, caught.value.status, caught.value.message) == fields
    assert str(caught.value) == "{} {}: {}".format(*fields)


# ----------------------------------------------------------------------- datasets


def test_create_get_delete_dataset():
    name = "accounts/acme/datasets/d"
    server = FakeServer({"POST datasets": ok({"name": name}), "GET datasets/d": ok({}), "DELETE datasets/d": ok({})})
    with server.client() as client:
        assert client.create_dataset("d", display_name="My data") == {"name": name}
        client.create_dataset("e")
        client.get_dataset(name)
        client.delete_dataset(name)
    assert server.calls == ["POST datasets", "POST datasets", "GET datasets/d", "DELETE datasets/d"]
    assert all(has_key(r) for r in server.requests)
    assert body(server.requests[0]) == {"datasetId": "d", "dataset": {"displayName": "My data", "userUploaded": {}}}
    assert body(server.requests[1]) == {"datasetId": "e", "dataset": {"userUploaded": {}}}


def test_upload_dataset_is_multipart_with_the_basename(tmp_path):
    path = tmp_path / "input.jsonl"
    path.write_bytes(b'{"custom_id": "1"}\n')
    server = FakeServer({"POST datasets/d:upload": ok({"state": "READY"})})
    with server.client() as client:
        assert client.upload_dataset("accounts/acme/datasets/d", path) == {"state": "READY"}
    (request,) = server.requests
    assert server.calls == ["POST datasets/d:upload"] and has_key(request)
    assert request.headers["content-type"].startswith("multipart/form-data")
    assert b'name="file"; filename="input.jsonl"' in request.content
    assert b'{"custom_id": "1"}\n' in request.content


def test_signed_upload_never_sends_the_key_to_the_signed_url(tmp_path):
    (tmp_path / "a.jsonl").write_bytes(b"xxx")
    (tmp_path / "b.jsonl").write_bytes(b"yyyyy")
    urls = {"a.jsonl": f"{SIGNED}/a?sig=1", "b.jsonl": f"{SIGNED}/b?sig=2"}
    server = FakeServer(
        {
            "POST datasets/d:getUploadEndpoint": ok({"filenameToSignedUrls": urls}),
            "PUT /a": ok({}),
            "PUT /b": ok({}),
            "POST datasets/d:validateUpload": ok({"state": "READY"}),
            "GET datasets/d": ok({"state": "READY"}),
        }
    )
    with server.client() as client:
        assert client.upload_dataset_signed("d", [tmp_path / "a.jsonl", str(tmp_path / "b.jsonl")])["state"] == "READY"
    assert server.calls == [
        "POST datasets/d:getUploadEndpoint", "PUT /a", "PUT /b", "POST datasets/d:validateUpload", "GET datasets/d"
    ]
    endpoint, put_a, put_b, validate, _ = server.requests
    assert [has_key(r) for r in server.requests] == [True, False, False, True, True]
    assert body(endpoint) == {"filenameToSize": {"a.jsonl": "3", "b.jsonl": "5"}}
    for put, data in ((put_a, b"xxx"), (put_b, b"yyyyy")):
        assert put.headers["content-type"] == "application/octet-stream"
        assert put.headers["content-length"] == str(len(data)) and put.content == data
    assert put_a.url.query == b"sig=1"
    assert body(validate) == {}


def test_a_failed_signed_put_raises_and_skips_validation(tmp_path):
    (tmp_path / "a.jsonl").write_bytes(b"x")
    server = FakeServer(
        {
            "POST datasets/d:getUploadEndpoint": ok({"filenameToSignedUrls": {"a.jsonl": f"{SIGNED}/a"}}),
            "PUT /a": httpx.Response(403, text="<Error>SignatureDoesNotMatch</Error>"),
        }
    )
    with server.client() as client, pytest.raises(ApiRequestError, match="403 FORBIDDEN"):
        client.upload_dataset_signed("d", [tmp_path / "a.jsonl"])
    assert server.calls == ["POST datasets/d:getUploadEndpoint", "PUT /a"]


def test_download_dataset_streams_each_file_without_the_key(tmp_path):
    urls = {"results.jsonl": f"{SIGNED}/r?sig=1", "errors.jsonl": f"{SIGNED}/e?sig=2"}
    server = FakeServer(
        {
            "GET datasets/out:getDownloadEndpoint": ok({"filenameToSignedUrls": urls}),
            "GET /r": httpx.Response(200, content=b"result\n"),
            "GET /e": httpx.Response(200, content=b"error\n"),
        }
    )
    with server.client() as client:
        paths = client.download_dataset("out", tmp_path / "dest", lineage=True)
    assert sorted(p.name for p in paths) == ["errors.jsonl", "results.jsonl"]
    assert sorted(p.name for p in (tmp_path / "dest").iterdir()) == ["errors.jsonl", "results.jsonl"]  # no temp files
    assert (tmp_path / "dest" / "results.jsonl").read_bytes() == b"result\n"
    assert [has_key(r) for r in server.requests] == [True, False, False]
    assert query(server.requests[0]) == {"downloadLineage": "true"}


@pytest.mark.parametrize("name", ["../x", "a/b", "a\\b", "..", ""])
def test_download_refuses_names_outside_the_folder(tmp_path, name):
    urls = {"ok.jsonl": f"{SIGNED}/ok", name: f"{SIGNED}/bad"}
    server = FakeServer(
        {
            "GET datasets/out:getDownloadEndpoint": ok({"filenameToSignedUrls": urls}),
            "GET /ok": httpx.Response(200, content=b"fine"),
            "GET /bad": httpx.Response(200, content=b"evil"),
        }
    )
    with server.client() as client, pytest.raises(ValueError, match="unsafe"):
        client.download_dataset("out", tmp_path / "dest")
    assert server.calls == ["GET datasets/out:getDownloadEndpoint"]  # refused before any fetch
    assert not (tmp_path / "x").exists() and not (tmp_path / "dest").exists()


def test_a_failed_download_leaves_no_file(tmp_path):
    urls = {"r.jsonl": f"{SIGNED}/r"}
    server = FakeServer(
        {"GET datasets/out:getDownloadEndpoint": ok({"filenameToSignedUrls": urls}), "GET /r": httpx.Response(403)}
    )
    with server.client() as client, pytest.raises(ApiRequestError):
        client.download_dataset("out", tmp_path)
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- jobs


def test_create_job_sends_camel_case_and_omits_unset_fields():
    server = FakeServer({"POST batchInferenceJobs": ok({"name": JOB_NAME})})
    parameters = {"max_tokens": 16, "topP": 0.5, "temperature": None, "extra_body": {"seed": 1}}
    with server.client() as client:
        client.create_job(
            model="m", input_dataset_id="in", job_id="j", inference_parameters=parameters, precision="FP16"
        )
        client.create_job(continued_from_job_name="accounts/acme/batchInferenceJobs/old")
    first, second = server.requests
    assert has_key(first) and query(first) == {"batchInferenceJobId": "j"}
    assert body(first) == {
        "model": "m",
        "inputDatasetId": "in",
        "inferenceParameters": {"maxTokens": 16, "topP": 0.5, "extraBody": '{"seed": 1}'},
        "precision": "FP16",
    }
    assert query(second) == {} and body(second) == {"continuedFromJobName": "accounts/acme/batchInferenceJobs/old"}


@pytest.mark.parametrize(
    "collection,listing,extra_query",
    [
        ("datasets", lambda client: client.iter_datasets(page_size=2), {}),
        (
            "batchInferenceJobs",
            lambda client: client.iter_jobs(page_size=2, order_by="createTime desc", filter='state="X"'),
            {"orderBy": "createTime desc", "filter": 'state="X"'},
        ),
    ],
)
def test_listing_follows_next_page_token(collection, listing, extra_query):
    pages = {
        None: {collection: [{"name": "1"}, {"name": "2"}], "nextPageToken": "t1", "totalSize": 3},
        "t1": {collection: [{"name": "3"}], "nextPageToken": "", "totalSize": 3},
    }
    server = FakeServer({f"GET {collection}": lambda r: ok(pages[query(r).get("pageToken")])})
    with server.client() as client:
        assert [item["name"] for item in listing(client)] == ["1", "2", "3"]
    first = {"pageSize": "2", **extra_query}
    assert [query(r) for r in server.requests] == [first, {**first, "pageToken": "t1"}]
    assert all(has_key(r) for r in server.requests)


def test_list_engines_asks_the_admin_route_not_an_account_route():
    server = FakeServer({"GET /v1/admin/engines": ok({"replicas": []})})
    assert server.client().list_engines() == {"replicas": []}
    assert [r.url.path for r in server.requests] == ["/v1/admin/engines"]  # not under /v1/accounts/acme/


def test_get_cancel_delete_job_take_the_last_name_segment():
    cancelling = {"state": "JOB_STATE_CANCELLING"}
    server = FakeServer(
        {"GET batchInferenceJobs/j": ok({}), "POST batchInferenceJobs/j:cancel": ok(cancelling),
         "DELETE batchInferenceJobs/j": ok({})}
    )
    with server.client() as client:
        client.get_job(JOB_NAME)
        assert client.cancel_job("j") == cancelling
        client.delete_job(JOB_NAME)
    calls = [("GET", "j"), ("POST", "j:cancel"), ("DELETE", "j")]
    assert server.calls == [f"{method} batchInferenceJobs/{path}" for method, path in calls]
    assert all(has_key(r) for r in server.requests)


def test_wait_job_polls_until_a_terminal_state_or_the_timeout():
    server = FakeServer({"GET batchInferenceJobs/j": job_sequence("JOB_STATE_PENDING", RUNNING, COMPLETED)})
    seen = []
    with server.client() as client:
        job = client.wait_job("j", poll_seconds=0, on_update=lambda j: seen.append(j["state"]))
    assert job["state"] == COMPLETED
    assert seen == ["JOB_STATE_PENDING", RUNNING, COMPLETED]
    with FakeServer({"GET batchInferenceJobs/j": job_sequence(RUNNING)}).client() as client:
        with pytest.raises(TimeoutError, match="still JOB_STATE_RUNNING"):
            client.wait_job("j", timeout=0)


# ------------------------------------------------------------------- the commands


SIGNED_STEPS = ["POST datasets/d:getUploadEndpoint", "PUT /in", "POST datasets/d:validateUpload", "GET datasets/d"]
UPLOAD_ROUTES = {
    "POST datasets": ok({"state": "UPLOADING"}),
    "POST datasets/d:upload": ok({"state": "READY"}),
    "POST datasets/d:getUploadEndpoint": lambda r: ok(
        {"filenameToSignedUrls": {name: f"{SIGNED}/in" for name in body(r)["filenameToSize"]}}
    ),
    "PUT /in": ok({}),
    "POST datasets/d:validateUpload": ok({}),
    "GET datasets/d": ok({"state": "READY"}),
}


def test_job_get_prints_json(monkeypatch, capsys):
    server = FakeServer({"GET batchInferenceJobs/j": ok({"name": "j", "state": RUNNING})})
    assert run_cli(monkeypatch, server, ["job", "get", "j"]) == 0
    assert json.loads(capsys.readouterr().out) == {"name": "j", "state": RUNNING}


def test_an_api_error_exits_4(monkeypatch, capsys):
    assert run_cli(monkeypatch, FakeServer({}), ["dataset", "get", "nope"]) == 4
    assert capsys.readouterr().err.strip() == "error: 404 NOT_FOUND: no route"


def test_bad_extra_body_exits_2_before_any_request(monkeypatch):
    server = FakeServer({})
    argv = ["job", "create", "--model", "m", "--input-dataset-id", "d", "--extra-body", "[1]"]
    assert run_cli(monkeypatch, server, argv) == 2
    assert server.requests == []


@pytest.mark.parametrize(
    "final,code,timeout",
    [(COMPLETED, 0, []), ("JOB_STATE_FAILED", 1, []), ("JOB_STATE_CANCELLED", 1, []),
     ("JOB_STATE_EXPIRED", 1, []), (RUNNING, 5, ["--timeout", "0"])],
)
def test_job_wait_exit_code_follows_the_final_state(monkeypatch, capsys, final, code, timeout):
    progress = {"totalInputRequests": 10, "totalProcessedRequests": 10, "failedRequests": 1}
    server = FakeServer({"GET batchInferenceJobs/j": job_sequence(RUNNING, final, progress=progress)})
    assert run_cli(monkeypatch, server, ["job", "wait", "j", *timeout]) == code
    out = capsys.readouterr().out  # a wait that timed out (5) prints no job
    assert json.loads(out)["state"] == final if code != 5 else out == ""


def test_job_create_with_wait(monkeypatch, capsys):
    created = {"name": JOB_NAME, "state": "JOB_STATE_VALIDATING"}
    server = FakeServer({"POST batchInferenceJobs": ok(created), "GET batchInferenceJobs/j": job_sequence(COMPLETED)})
    argv = ["job", "create", "--model", "m", "--input-dataset-id", "d", "--job-id", "j", "--max-tokens", "8"]
    assert run_cli(monkeypatch, server, [*argv, "--top-k", "5", "--extra-body", '{"seed": 1}', "--wait"]) == 0
    parameters = {"maxTokens": 8, "topK": 5, "extraBody": '{"seed": 1}'}
    assert body(server.requests[0]) == {"model": "m", "inputDatasetId": "d", "inferenceParameters": parameters}
    assert query(server.requests[0]) == {"batchInferenceJobId": "j"}
    assert json.loads(capsys.readouterr().out)["state"] == COMPLETED


def test_job_list_prints_a_table(monkeypatch, capsys):
    time = "2025-01-01T00:00:00Z"
    jobs = [{"name": JOB_NAME, "state": RUNNING, "createTime": time, "jobProgress": {"percent": 42}}]
    server = FakeServer({"GET batchInferenceJobs": ok({"batchInferenceJobs": jobs})})
    assert run_cli(monkeypatch, server, ["job", "list", "--order-by", "createTime"]) == 0
    header, row = capsys.readouterr().out.splitlines()
    assert header.split() == ["NAME", "STATE", "CREATE", "TIME", "PERCENT"]
    assert row.split() == [JOB_NAME, RUNNING, time, "42%"]
    assert query(server.requests[0]) == {"orderBy": "createTime"}


@pytest.mark.parametrize(
    "argv,limit,steps",
    [
        (["create", "d", "--file", "IN"], None, ["POST datasets", "POST datasets/d:upload", "GET datasets/d"]),
        (["create", "d", "--file", "IN", "--signed-upload"], None, ["POST datasets", *SIGNED_STEPS]),
        (["upload", "d", "IN"], None, ["POST datasets/d:upload", "GET datasets/d"]),
        (["upload", "d", "IN"], 2, SIGNED_STEPS),  # over the direct-upload limit
        (["upload", "d", "IN", "--signed-upload"], None, SIGNED_STEPS),
        (["upload", "d", "IN", "MORE"], None, [SIGNED_STEPS[0], "PUT /in", *SIGNED_STEPS[1:]]),  # several files
    ],
)
def test_dataset_uploads_take_the_right_route(monkeypatch, tmp_path, argv, limit, steps):
    files = {"IN": tmp_path / "in.jsonl", "MORE": tmp_path / "more.jsonl"}
    for path in files.values():
        path.write_bytes(b"{}\n")
    if limit is not None:
        monkeypatch.setattr(datasets, "DIRECT_UPLOAD_MAX_BYTES", limit)
    server = FakeServer(UPLOAD_ROUTES)
    assert run_cli(monkeypatch, server, ["dataset", *(str(files.get(a, a)) for a in argv)]) == 0
    assert server.calls == steps


@pytest.mark.parametrize("names", [["in.jsonl", "missing.jsonl"], ["in.jsonl", "in.jsonl"]])
def test_missing_or_same_named_files_exit_2_before_any_request(monkeypatch, tmp_path, names):
    (tmp_path / "in.jsonl").write_bytes(b"{}\n")
    server = FakeServer(UPLOAD_ROUTES)
    assert run_cli(monkeypatch, server, ["dataset", "upload", "d", *(str(tmp_path / n) for n in names)]) == 2
    assert server.requests == []


def test_dataset_download_of_an_unsafe_name_exits_4(monkeypatch, tmp_path):
    urls = {"filenameToSignedUrls": {"../x": f"{SIGNED}/x"}}
    server = FakeServer({"GET datasets/d:getDownloadEndpoint": ok(urls)})
    assert run_cli(monkeypatch, server, ["dataset", "download", "d", "--output-dir", str(tmp_path / "out")]) == 4
    assert not (tmp_path / "x").exists()


def test_dataset_list_and_delete(monkeypatch, capsys):
    dataset = {"name": "accounts/acme/datasets/d", "state": "READY", "createTime": "t", "exampleCount": "3"}
    server = FakeServer({"GET datasets": ok({"datasets": [dataset]}), "DELETE datasets/d": ok({})})
    assert run_cli(monkeypatch, server, ["dataset", "list", "--page-size", "5"]) == 0
    assert run_cli(monkeypatch, server, ["dataset", "delete", "accounts/acme/datasets/d"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[1].split() == ["accounts/acme/datasets/d", "READY", "t", "3"]
    assert out[2] == "deleted dataset d"
    assert query(server.requests[0]) == {"pageSize": "5"}
