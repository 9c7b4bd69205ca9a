"""Auth and isolation over real HTTP: every way a key can be wrong gets 401; account B
never sees account A's resources (404, never data), also when it names them inside a
body; bad IDs get 400 before any storage call; oversized bodies 413; keys never land in
logs or storage."""

from __future__ import annotations

import pathlib
import subprocess
import sys

import httpx
import pytest

from raybatch.api.auth import KEY_FORMAT
from tests.helpers import sdk_client, wait_job

A, B = "alpha", "bravo"


@pytest.fixture(scope="module")
def world(service, tmp_path_factory):
    key_a, key_b = service.key(A), service.key(B)
    client_a = sdk_client(service.base_url, key_a, A)
    client_a.datasets.create(dataset_id="secret-data", dataset={"user_uploaded": {}})
    line = b'{"custom_id": "c1", "body": {"messages": [{"role": "user", "content": "top secret"}]}}\n'
    client_a.datasets.upload("secret-data", file=("input.jsonl", line))
    client_a.batch_inference_jobs.create(batch_inference_job_id="secret-job", model="scripted", input_dataset_id="secret-data")
    wait_job(client_a, "secret-job", timeout=120)
    return service, key_a, key_b


def _key_parts(key: str) -> tuple[str, str]:
    """(key id, secret), parsed as the server parses keys (the secret may hold `_`)."""
    match = KEY_FORMAT.fullmatch(key)
    assert match, f"not a key: {key!r}"
    return match.groups()


def _call(service, method: str, path: str, key=None, headers=None, **kwargs) -> httpx.Response:
    headers = headers or ({"Authorization": f"Bearer {key}"} if key else {})
    return httpx.request(method, f"{service.base_url}{path}", headers=headers, timeout=60, **kwargs)


def _assert_error(reply: httpx.Response, code: int, status: str) -> None:
    assert reply.status_code == code, reply.text
    body = reply.json()
    # Fireworks' gateway body (gRPC code number), with the earlier `error` object beside it.
    grpc = {"UNAUTHENTICATED": 16, "NOT_FOUND": 5, "INVALID_ARGUMENT": 3, "PERMISSION_DENIED": 7,
            "RESOURCE_EXHAUSTED": 8, "FAILED_PRECONDITION": 9}[status]
    assert set(body) == {"code", "message", "details", "error"} and body["code"] == grpc and body["details"] == []
    assert body["error"]["code"] == code and body["error"]["status"] == status
    assert isinstance(body["message"], str) and body["message"] and body["error"]["message"] == body["message"]


def test_missing_malformed_wrong_and_revoked_keys_get_401(world):
    service, key_a, _ = world
    path = f"/v1/accounts/{A}/datasets"
    key_id, secret = _key_parts(key_a)
    wrong_secret = f"rbk_{key_id}_{'x' * 43}"
    unknown_id = f"rbk_k000000000000_{secret}"
    for key in (None, "nonsense", key_a[:-1], wrong_secret, unknown_id):
        _assert_error(_call(service, "GET", path, key), 401, "UNAUTHENTICATED")
    assert _call(service, "GET", path, headers={"Authorization": f"Basic {key_a}"}).status_code == 401

    from raybatch.api.auth import revoke_key
    from raybatch.store import Store

    doomed = service.key(A)
    assert _call(service, "GET", path, doomed).status_code == 200
    revoke_key(Store(service.storage), _key_parts(doomed)[0])
    _assert_error(_call(service, "GET", path, doomed), 401, "UNAUTHENTICATED")


# Every keyed route of the API (each method verb apart), as a request on account A's
# resources. `test_the_matrix_covers_every_route` holds this list to the app's routes.
EVERY_ROUTE = [
    ("GET", "/openapi.json", None),
    ("POST", f"/v1/accounts/{A}/datasets", {"datasetId": "new-data", "dataset": {"userUploaded": {}}}),
    ("GET", f"/v1/accounts/{A}/datasets", None),
    ("GET", f"/v1/accounts/{A}/datasets/secret-data", None),
    ("GET", f"/v1/accounts/{A}/datasets/secret-data:getDownloadEndpoint", None),
    ("PATCH", f"/v1/accounts/{A}/datasets/secret-data", {"displayName": "mine now"}),
    ("DELETE", f"/v1/accounts/{A}/datasets/secret-data", None),
    ("POST", f"/v1/accounts/{A}/datasets/secret-data:upload", None),
    ("POST", f"/v1/accounts/{A}/datasets/secret-data:getUploadEndpoint", {"filenameToSize": {"x.jsonl": 10}}),
    ("POST", f"/v1/accounts/{A}/datasets/secret-data:validateUpload", {}),
    ("POST", f"/v1/accounts/{A}/batchInferenceJobs", {"model": "scripted", "inputDatasetId": "secret-data"}),
    ("POST", f"/v1/accounts/{A}/batchInferenceJobs:validate", {"model": "scripted", "inputDatasetId": "secret-data"}),
    ("GET", f"/v1/accounts/{A}/batchInferenceJobs", None),
    ("GET", f"/v1/accounts/{A}/batchInferenceJobs/secret-job", None),
    ("POST", f"/v1/accounts/{A}/batchInferenceJobs/secret-job:cancel", None),
    ("DELETE", f"/v1/accounts/{A}/batchInferenceJobs/secret-job", None),
    ("GET", "/v1/admin/engines", None),
]
# Not keyed: the health check, and the signed file URLs, whose token is the credential
# (tests/security/test_uploads.py attacks those).
UNKEYED = {("GET", "/healthz"), ("PUT", "/v1/signed/{token}"), ("GET", "/v1/signed/{token}")}


def test_the_matrix_covers_every_route():
    from starlette.routing import Match

    from raybatch.api.app import api

    routes = {(method, route.path): route for route in api.routes for method in getattr(route, "methods", ())}
    matched = set()
    for method, path, _ in EVERY_ROUTE:
        found = [key for key, route in routes.items() if key[0] == method
                 and route.matches({"type": "http", "method": method, "path": path.partition("?")[0]})[0] == Match.FULL]
        assert len(found) == 1, f"{method} {path} matches {found}"
        matched |= set(found)
    assert set(routes) - UNKEYED - {("HEAD", path) for _, path in routes} == matched


def test_every_route_refuses_every_bad_key_and_never_shows_data(world):
    """The auth matrix: every keyed route x {no key, malformed, wrong secret, revoked,
    another account's key}. A bad key gets 401 on every route, another account's key 404
    on A's resources (403 on the admin route, for a non-admin), and nothing changes."""
    service, key_a, key_b = world
    from raybatch.api.auth import revoke_key
    from raybatch.store import Store

    revoked = service.key(A)
    revoke_key(Store(service.storage), _key_parts(revoked)[0])
    key_id, _ = _key_parts(key_a)
    bad_keys = {"no key": None, "malformed": "rbk_nonsense", "wrong secret": f"rbk_{key_id}_{'x' * 43}",
                "revoked": revoked}
    for method, path, body in EVERY_ROUTE:
        for name, key in bad_keys.items():
            reply = _call(service, method, path, key, json=body)
            assert reply.status_code == 401, (name, method, path, reply.text)
            _assert_error(reply, 401, "UNAUTHENTICATED")
        if path == "/openapi.json":
            continue  # any valid key may read the schema: it lists routes, not data
        reply = _call(service, method, path, key_b, json=body)
        if path == "/v1/admin/engines":
            _assert_error(reply, 403, "PERMISSION_DENIED")
        else:
            _assert_error(reply, 404, "NOT_FOUND")
        assert "top secret" not in reply.text and "JOB_STATE" not in reply.text and "secret-data" not in reply.text.replace(path, "")
    # Nothing of A's changed, and nothing was created in A's name.
    job = _call(service, "GET", f"/v1/accounts/{A}/batchInferenceJobs/secret-job", key_a).json()
    assert job["state"] == "JOB_STATE_COMPLETED"
    data = _call(service, "GET", f"/v1/accounts/{A}/datasets/secret-data", key_a).json()
    assert data["state"] == "READY" and data.get("displayName") != "mine now"
    assert _call(service, "GET", f"/v1/accounts/{A}/datasets/new-data", key_a).status_code == 404


@pytest.mark.parametrize(
    "method,path,body",
    [
        ("GET", f"/v1/accounts/{A}/batchInferenceJobs/secret-job", None),
        ("GET", f"/v1/accounts/{A}/batchInferenceJobs", None),
        ("GET", f"/v1/accounts/{A}/datasets", None),
        ("GET", f"/v1/accounts/{A}/datasets/secret-data", None),
        ("GET", f"/v1/accounts/{A}/datasets/secret-data:getDownloadEndpoint", None),
        ("POST", f"/v1/accounts/{A}/batchInferenceJobs/secret-job:cancel", None),
        ("DELETE", f"/v1/accounts/{A}/batchInferenceJobs/secret-job", None),
        ("DELETE", f"/v1/accounts/{A}/datasets/secret-data", None),
        ("PATCH", f"/v1/accounts/{A}/datasets/secret-data", {"displayName": "mine now"}),
    ],
)
def test_another_accounts_resources_do_not_exist(world, method, path, body):
    service, _, key_b = world
    reply = _call(service, method, path, key_b, json=body)
    _assert_error(reply, 404, "NOT_FOUND")
    assert "top secret" not in reply.text and "JOB_STATE" not in reply.text


def test_naming_another_accounts_resources_in_a_body_is_refused(world):
    service, key_a, key_b = world
    jobs = f"/v1/accounts/{B}/batchInferenceJobs"
    for body in (
        {"model": "scripted", "inputDatasetId": f"accounts/{A}/datasets/secret-data"},
        {"continuedFromJobName": f"accounts/{A}/batchInferenceJobs/secret-job"},
        {"model": "scripted", "inputDatasetId": "secret-data"},  # a bare ID is B's own: none
    ):
        _assert_error(_call(service, "POST", jobs, key_b, json=body), 404, "NOT_FOUND")
    # A's own job and data are untouched.
    job = _call(service, "GET", f"/v1/accounts/{A}/batchInferenceJobs/secret-job", key_a).json()
    assert job["state"] == "JOB_STATE_COMPLETED"
    listed = _call(service, "GET", jobs, key_b).json()
    assert listed == {"batchInferenceJobs": [], "totalSize": 0, "nextPageToken": ""}


@pytest.mark.parametrize("bad_id", ["../x", "A", "a" * 64, "1abc", "a_b", "", "a/b"])
def test_bad_ids_get_400_before_any_storage_call(world, bad_id):
    service, key_a, _ = world
    body = {"datasetId": bad_id, "dataset": {}}
    # Without a key too: the ID is refused before the key is even looked up.
    for key in (key_a, None):
        _assert_error(_call(service, "POST", f"/v1/accounts/{A}/datasets", key, json=body), 400, "INVALID_ARGUMENT")
    if bad_id and "/" not in bad_id:
        _assert_error(_call(service, "GET", f"/v1/accounts/{A}/datasets/{bad_id}", key_a), 400, "INVALID_ARGUMENT")
        reply = _call(service, "POST", f"/v1/accounts/{A}/batchInferenceJobs", key_a,
                      params={"batchInferenceJobId": bad_id}, json={"model": "scripted", "inputDatasetId": "secret-data"})
        _assert_error(reply, 400, "INVALID_ARGUMENT")
    _assert_error(_call(service, "GET", "/v1/accounts/%2E%2E/datasets", key_a), 400, "INVALID_ARGUMENT")


def test_a_64_character_id_is_refused_and_63_accepted(world):
    service, key_a, _ = world
    datasets = f"/v1/accounts/{A}/datasets"
    assert _call(service, "POST", datasets, key_a, json={"datasetId": "d" * 63, "dataset": {}}).status_code == 200
    _assert_error(_call(service, "POST", datasets, key_a, json={"datasetId": "d" * 64, "dataset": {}}), 400, "INVALID_ARGUMENT")


def test_oversized_bodies_get_413(world):
    service, key_a, _ = world
    big = {"datasetId": "big", "dataset": {"displayName": "x" * (2 << 20)}}
    _assert_error(_call(service, "POST", f"/v1/accounts/{A}/datasets", key_a, json=big), 413, "RESOURCE_EXHAUSTED")

    def chunked():  # no Content-Length: counted as it streams
        for _ in range(3):
            yield b" " * (1 << 20)

    reply = _call(service, "POST", f"/v1/accounts/{A}/datasets", key_a, content=chunked())
    _assert_error(reply, 413, "RESOURCE_EXHAUSTED")


def test_unknown_routes_and_bad_queries_use_the_error_format(world):
    service, key_a, _ = world
    _assert_error(_call(service, "GET", "/v1/nothing-here", key_a), 404, "NOT_FOUND")
    _assert_error(_call(service, "GET", f"/v1/accounts/{A}/datasets", key_a, params={"pageSize": "lots"}), 400, "INVALID_ARGUMENT")
    _assert_error(_call(service, "GET", f"/v1/accounts/{A}/datasets", key_a, params={"pageToken": "!!"}), 400, "INVALID_ARGUMENT")
    _assert_error(_call(service, "GET", f"/v1/accounts/{A}/batchInferenceJobs", key_a, params={"filter": "cost>3"}), 400, "INVALID_ARGUMENT")
    _assert_error(_call(service, "GET", f"/v1/accounts/{A}/batchInferenceJobs", key_a, params={"page_sise": "5"}), 400, "INVALID_ARGUMENT")


def test_keys_cli_prints_the_key_once_and_stores_only_a_hash(world):
    service = world[0]
    cli = [sys.executable, "-m", "raybatch.cli", "keys", "--storage", service.storage]
    made = subprocess.run([*cli, "create", "--account", "charlie"], capture_output=True, text=True, check=True)
    key = made.stdout.strip().splitlines()[-1]
    assert _call(service, "GET", "/v1/accounts/charlie/datasets", key).status_code == 200
    listed = subprocess.run([*cli, "list"], capture_output=True, text=True, check=True).stdout
    key_id, secret = _key_parts(key)
    assert key_id in listed and secret not in listed and "charlie" in listed
    subprocess.run([*cli, "revoke", key_id], capture_output=True, text=True, check=True)
    assert _call(service, "GET", "/v1/accounts/charlie/datasets", key).status_code == 401
    stored = b"".join(p.read_bytes() for p in pathlib.Path(service.storage, "keys").iterdir())
    assert secret.encode() not in stored


def test_keys_never_appear_in_logs(world):
    service, key_a, key_b = world
    _call(service, "GET", f"/v1/accounts/{A}/datasets", "rbk_k000000000000_" + _key_parts(key_a)[1])  # a refused one too
    logs = pathlib.Path("/tmp/ray/session_latest/logs")
    secrets = [_key_parts(key)[1].encode() for key in (key_a, key_b)]
    for path in logs.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            assert not any(secret in data for secret in secrets), f"a key is in {path}"
