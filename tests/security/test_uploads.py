"""Issue 10, items 4, 5 and 8, against the running service: hidden upload names, signed
upload URLs used after READY, with the wrong size, after revocation or by the thousand,
forged signed paths (with the real signing key), file modes on local storage, and the
same attacks on S3 storage (moto) where the URLs are S3's own."""

from __future__ import annotations

import os
import stat

import boto3
import httpx
import pytest
from itsdangerous import URLSafeTimedSerializer

from raybatch.api.auth import revoke_key
from raybatch.store import Store
from tests.helpers import second_app, service_config, validation_outcome

ACCOUNT = "uploader"
LINE = b'{"custom_id": "a", "body": {"messages": [{"role": "user", "content": "hi"}]}}\n'
EVIL = b'{"custom_id": "b", "body": {"messages": [{"role": "user", "content": "ho"}]}}\n'  # same size


def _call(service, key, method, path, **kwargs) -> httpx.Response:
    return httpx.request(method, f"{service.base_url}/v1/accounts/{ACCOUNT}/{path}",
                         headers={"Authorization": f"Bearer {key}"}, timeout=60, **kwargs)


def _new_dataset(service, key, dataset_id: str) -> None:
    reply = _call(service, key, "POST", "datasets", json={"datasetId": dataset_id, "dataset": {"userUploaded": {}}})
    assert reply.status_code == 200, reply.text


def _upload_urls(service, key, dataset_id: str, sizes: dict) -> dict:
    reply = _call(service, key, "POST", f"datasets/{dataset_id}:getUploadEndpoint", json={"filenameToSize": sizes})
    assert reply.status_code == 200, reply.text
    return reply.json()["filenameToSignedUrls"]


def _download(service, key, dataset_id: str) -> dict[str, bytes]:
    urls = _call(service, key, "GET", f"datasets/{dataset_id}:getDownloadEndpoint").json()["filenameToSignedUrls"]
    return {name: httpx.get(url, timeout=60).content for name, url in urls.items()}


@pytest.fixture(scope="module")
def key(service):
    return service.key(ACCOUNT)



def _validated(reply, get_dataset) -> bool:
    """READY, now or after a validation that went on in the background (it waits at
    most validation_wait_seconds, 1 s, and S3 on a busy machine can take longer)."""
    return validation_outcome(reply, get_dataset) == (200, "OK", "")


def test_internal_names_are_never_stored(service, key):
    """Item 4: `p.tmp-1.jsonl` passed the name rule; the size checks' listing hid it and
    the job's shard listing read it. `:getUploadEndpoint` (whose names the client then
    writes under) refuses it and stores nothing; `:upload`, which stores what it is sent
    under a name of its own choosing (as Fireworks takes any file name there), stores it
    under a safe name."""
    _new_dataset(service, key, "hidden")
    reply = _call(service, key, "POST", "datasets/hidden:getUploadEndpoint", json={"filenameToSize": {"p.tmp-1.jsonl": 10}})
    assert reply.status_code == 400, reply.text
    assert reply.json()["error"] == {"code": 400, "status": "INVALID_ARGUMENT", "message": (
        "invalid file name 'p.tmp-1.jsonl': '.tmp-' marks the service's own unfinished files")}
    assert not os.path.exists(os.path.join(service.storage, f"accounts/{ACCOUNT}/datasets/hidden/files"))
    reply = _call(service, key, "POST", "datasets/hidden:upload", files={"file": ("p.tmp-1.jsonl", LINE)})
    assert reply.status_code == 200 and reply.json()["filename"] == "p-1.jsonl", reply.text
    assert _validated(reply, lambda: _call(service, key, "GET", "datasets/hidden").json())
    assert _download(service, key, "hidden") == {"p-1.jsonl": LINE}


def test_a_failed_upload_leaves_nothing_behind(service, key):
    """A file that is stored and then fails validation (not JSONL is fine; a file over
    the limit once expanded is not) is deleted: the dataset holds no file."""
    import zlib

    stream = zlib.compressobj(6, zlib.DEFLATED, 31)
    limit = 500 << 20
    bomb = b"".join(stream.compress(b"\n" * (1 << 20)) for _ in range(limit // (1 << 20) + 2)) + stream.flush()
    _new_dataset(service, key, "failed")
    reply = _call(service, key, "POST", "datasets/failed:upload", files={"file": ("big.jsonl", bomb)})
    # Refused in the answer (413) or, validated in the background, in the dataset's status.
    status, code, _ = validation_outcome(reply, lambda: _call(service, key, "GET", "datasets/failed").json())
    assert status in (400, 413) and code == "RESOURCE_EXHAUSTED", reply.text
    files = os.path.join(service.storage, f"accounts/{ACCOUNT}/datasets/failed/files")
    assert not os.path.exists(files) or os.listdir(files) == []
    assert _download(service, key, "failed") == {}


def test_a_signed_put_after_ready_is_refused_and_changes_nothing(service, key):
    """Item 5: a local signed PUT was accepted after READY, so same-size content could
    be swapped in under a validated dataset."""
    _new_dataset(service, key, "swap")
    url = _upload_urls(service, key, "swap", {"a.jsonl": len(LINE)})["a.jsonl"]
    assert httpx.put(url, content=LINE, timeout=60).status_code == 200
    assert _validated(_call(service, key, "POST", "datasets/swap:validateUpload", json={}), lambda: _call(service, key, "GET", "datasets/swap").json())
    reply = httpx.put(url, content=EVIL, timeout=60)
    assert reply.status_code == 400 and reply.json()["error"]["status"] == "FAILED_PRECONDITION", reply.text
    assert _download(service, key, "swap") == {"a.jsonl": LINE}
    assert not os.path.exists(os.path.join(service.storage, f"accounts/{ACCOUNT}/datasets/swap/uploads"))


def test_a_signed_put_takes_exactly_the_registered_size(service, key):
    _new_dataset(service, key, "sized")
    url = _upload_urls(service, key, "sized", {"a.jsonl": len(LINE)})["a.jsonl"]
    short = httpx.put(url, content=LINE[:-5], timeout=60)
    assert short.status_code == 400 and "bytes sent" in short.json()["error"]["message"]
    long = httpx.put(url, content=LINE + b"\n" * 10, timeout=60)
    assert long.status_code == 413
    reply = _call(service, key, "POST", "datasets/sized:validateUpload", json={})
    assert reply.status_code == 400 and reply.json()["error"]["message"] == "file a.jsonl was registered but not uploaded"
    # A URL of a replaced registration writes nothing the new one reads.
    old = url
    new = _upload_urls(service, key, "sized", {"a.jsonl": len(LINE)})["a.jsonl"]
    assert httpx.put(old, content=EVIL, timeout=60).status_code == 400
    assert httpx.put(new, content=LINE, timeout=60).status_code == 200
    assert _validated(_call(service, key, "POST", "datasets/sized:validateUpload", json={}), lambda: _call(service, key, "GET", "datasets/sized").json())
    assert _download(service, key, "sized") == {"a.jsonl": LINE}


def test_revoking_a_key_ends_its_urls(service, key):
    doomed = service.key(ACCOUNT)
    _new_dataset(service, doomed, "revoked")
    url = _upload_urls(service, doomed, "revoked", {"a.jsonl": len(LINE)})["a.jsonl"]
    _, key_id, _ = doomed.split("_", 2)
    revoke_key(Store(service.storage), key_id)
    reply = httpx.put(url, content=LINE, timeout=60)
    assert reply.status_code == 404 and reply.json()["error"]["message"] == "signed URL invalid or expired"
    # Bytes PUT before the revocation are not trusted either: another key's validate refuses.
    _new_dataset(service, key, "revoked-late")
    late = service.key(ACCOUNT)
    url = _upload_urls(service, late, "revoked-late", {"a.jsonl": len(LINE)})["a.jsonl"]
    assert httpx.put(url, content=LINE, timeout=60).status_code == 200
    revoke_key(Store(service.storage), late.split("_", 2)[1])
    reply = _call(service, key, "POST", "datasets/revoked-late:validateUpload", json={})
    assert reply.status_code == 400 and "was revoked" in reply.json()["error"]["message"]
    assert _call(service, key, "GET", "datasets/revoked-late").json()["state"] == "UPLOADING"


def test_one_request_cannot_ask_for_thousands_of_urls(service, key):
    _new_dataset(service, key, "many")
    reply = _call(service, key, "POST", "datasets/many:getUploadEndpoint",
                  json={"filenameToSize": {f"f{i}.jsonl": 1 for i in range(5000)}})
    assert reply.status_code == 400
    assert reply.json()["error"]["message"] == "filenameToSize names 5000 files, over the limit of 100"


def test_forged_signed_paths_reach_nothing_but_dataset_files(service, key):
    """Item 8: with the signing key (read here as a user of the host could before it
    was 0600), a token could name any path: a key record, the key itself, any file."""
    store = Store(service.storage)
    record = store.get_key(key.split("_", 2)[1])
    forge = URLSafeTimedSerializer(store.signing_key(), salt="raybatch-file-url")
    signed = f"{service.base_url}/v1/signed/"
    for note in (
        {"op": "get", "key": record.key_id, "path": "service/signing-key"},
        {"op": "get", "key": record.key_id, "path": f"keys/{record.key_id}.json"},
        {"op": "get", "key": record.key_id, "path": "/etc/passwd"},
        {"op": "get", "key": record.key_id, "path": f"accounts/{ACCOUNT}/datasets/swap/files/../../../../keys/x.jsonl"},
        {"op": "get", "key": record.key_id, "path": "accounts/alpha/datasets/secret-data/files/input.jsonl"},
    ):
        reply = httpx.get(signed + forge.dumps(note), timeout=60)
        assert reply.status_code == 404 and reply.json()["error"]["message"] == "signed URL invalid or expired", note
    for note in (
        {"op": "put", "key": record.key_id, "path": f"keys/{record.key_id}.json", "size": 10},
        {"op": "put", "key": record.key_id, "account": ACCOUNT, "dataset": "swap", "nonce": "0" * 32,
         "file": "../../../../keys/x.jsonl", "size": 10},
        {"op": "put", "key": record.key_id, "account": "alpha", "dataset": "secret-data", "nonce": "0" * 32,
         "file": "a.jsonl", "size": 10},
    ):
        reply = httpx.put(signed + forge.dumps(note), content=b"x" * 10, timeout=60)
        assert reply.status_code == 404, note
    assert store.get_key(record.key_id) == record


def _private(path: str) -> bool:
    return stat.S_IMODE(os.stat(path).st_mode) & 0o077 == 0


def test_local_storage_is_the_service_users_only(service, key):
    """Item 8: the store was 0644/0755, readable by every user of the host."""
    root = service.storage
    assert _private(root)
    checked = [os.path.join(root, "service", "signing-key"), os.path.join(root, "service"),
               os.path.join(root, "keys"), os.path.join(root, "keys", f"{key.split('_', 2)[1]}.json")]
    dataset = os.path.join(root, f"accounts/{ACCOUNT}/datasets/swap")
    for folder, _, names in os.walk(dataset):
        checked.append(folder)
        checked.extend(os.path.join(folder, name) for name in names)
    assert len(checked) > 6
    assert [path for path in checked if not _private(path)] == []


# ------------------------------------------------------------------------- S3

@pytest.fixture(scope="module")
def s3_service(service, s3_endpoint, tiny_model):
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket="raybatch-sec")
    with second_app(service, service_config("s3://raybatch-sec/root", tiny_model), "s3sec") as app:
        yield app


def test_s3_urls_sign_the_size_and_end_with_the_upload(s3_service, s3_endpoint):
    key = s3_service.key(ACCOUNT)
    _new_dataset(s3_service, key, "on-s3")
    url = _upload_urls(s3_service, key, "on-s3", {"a.jsonl": len(LINE)})["a.jsonl"]
    signed_headers = httpx.URL(url).params["X-Amz-SignedHeaders"].split(";")
    assert "content-length" in signed_headers  # S3 refuses any other size
    assert f"/root/accounts/{ACCOUNT}/datasets/on-s3/uploads/" in url  # never straight into files/
    assert httpx.put(url, content=LINE, timeout=60).status_code == 200
    assert _validated(_call(s3_service, key, "POST", "datasets/on-s3:validateUpload", json={}), lambda: _call(s3_service, key, "GET", "datasets/on-s3").json())
    # The URL still answers (S3 knows nothing of READY), but what it writes is never read.
    httpx.put(url, content=EVIL, timeout=60)
    assert _download(s3_service, key, "on-s3") == {"a.jsonl": LINE}
    # Validating a READY dataset again answers it as it is (idempotent, as Fireworks'
    # is): it does not take in what was written since.
    again = _call(s3_service, key, "POST", "datasets/on-s3:validateUpload", json={})
    assert again.status_code == 200 and again.json()["state"] == "READY", again.text
    assert _download(s3_service, key, "on-s3") == {"a.jsonl": LINE}
    # No signed-write route, and no signing key in the bucket.
    assert httpx.put(f"{s3_service.base_url}/v1/signed/anything", content=b"x", timeout=60).status_code == 404
    bucket = boto3.client("s3", endpoint_url=s3_endpoint)
    # (service/ holds the scheduler's job index markers, never a signing key.)
    listed = bucket.list_objects_v2(Bucket="raybatch-sec", Prefix="root/service/").get("Contents", [])
    assert "root/service/signing-key" not in {item["Key"] for item in listed}
