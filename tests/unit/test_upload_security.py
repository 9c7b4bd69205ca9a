"""Issue 10, items 4, 5 and 8 without a cluster: the listings, file modes, signed-URL
confinement and the upload area, on local storage."""

from __future__ import annotations

import io
import os
import stat

import pytest
from itsdangerous import URLSafeTimedSerializer

from raybatch.api.auth import create_key, revoke_key
from raybatch.api.datasets import DatasetService
from raybatch.api.signing import UrlSigner
from raybatch.config import ServiceConfig
from raybatch.exceptions import FailedPrecondition, InvalidArgument, NotFound, PayloadTooLarge
from raybatch.resources import DatasetFields
from raybatch.storage import list_shards
from raybatch.store import Store

LINE = b'{"custom_id": "a", "body": {"messages": [{"role": "user", "content": "hi"}]}}\n'


@pytest.fixture
def world(tmp_path):
    store = Store(str(tmp_path / "storage"))
    key, record = create_key(store, "acme")
    datasets = DatasetService(store, ServiceConfig(storage=store.root_url, max_upload_files=3))
    datasets.create("acme", "d", DatasetFields(), record.key_id)
    return store, datasets, record, UrlSigner(store, 60)


def _private(path) -> bool:
    return stat.S_IMODE(os.stat(path).st_mode) & 0o077 == 0


def test_shards_and_size_checks_list_the_same_files(tmp_path):
    (tmp_path / "a.jsonl").write_bytes(LINE)
    (tmp_path / "p.tmp-1.jsonl").write_bytes(LINE * 1000)
    assert [s.name for s in list_shards(str(tmp_path))] == ["a.jsonl"]


def test_internal_names_are_refused_and_a_failed_upload_leaves_nothing(world):
    store, datasets, _, _ = world
    with pytest.raises(InvalidArgument, match="service's own unfinished files"):
        datasets.upload("acme", "d", "p.tmp-1.jsonl", io.BytesIO(LINE))
    with pytest.raises(InvalidArgument):
        datasets.upload_plan("acme", "d", {"p.tmp-1.jsonl": 10}, "k")
    with pytest.raises(PayloadTooLarge):  # stored, then refused by validation
        DatasetService(store, ServiceConfig(storage=store.root_url, max_dataset_bytes=len(LINE))).upload(
            "acme", "d", "ok.jsonl", io.BytesIO(LINE * 2)
        )
    assert os.listdir(store.dataset_files("acme", "d").root) == []


def test_local_storage_is_private(world):
    store, datasets, record, _ = world
    datasets.upload("acme", "d", "ok.jsonl", io.BytesIO(LINE))
    root = store.location.root
    for folder, _, names in os.walk(root):
        assert _private(folder), folder
        for name in names:
            assert _private(os.path.join(folder, name)), name
    assert {"signing-key"} <= set(os.listdir(os.path.join(root, "service")))


def test_upload_area_binds_urls_to_registration_state_and_key(world):
    store, datasets, record, signer = world
    with pytest.raises(InvalidArgument, match="over the limit of 3"):
        datasets.upload_plan("acme", "d", {f"f{i}.jsonl": 1 for i in range(4)}, record.key_id)
    nonce, _ = datasets.upload_plan("acme", "d", {"a.jsonl": len(LINE)}, record.key_id)
    token = signer.upload_url("http://x", record.key_id, "acme", "d", nonce, "a.jsonl", len(LINE)).rsplit("/", 1)[1]
    note = signer.open(token, "put")
    assert note["path"] == f"accounts/acme/datasets/d/uploads/{nonce}/a.jsonl"
    store.location.write_atomic(note["path"], LINE)
    assert datasets.validate("acme", "d").state.value == "READY"
    assert os.listdir(store.dataset_files("acme", "d").root) == ["a.jsonl"]
    assert not store.location.exists("accounts/acme/datasets/d/uploads")
    # A second dataset whose URLs' key is revoked before validation.
    datasets.create("acme", "e", DatasetFields(), record.key_id)
    nonce, _ = datasets.upload_plan("acme", "e", {"a.jsonl": len(LINE)}, record.key_id)
    store.location.write_atomic(f"accounts/acme/datasets/e/uploads/{nonce}/a.jsonl", LINE)
    revoke_key(store, record.key_id)
    with pytest.raises(NotFound):
        signer.open(token, "put")
    with pytest.raises(FailedPrecondition, match="was revoked"):
        datasets.validate("acme", "e")


def test_forged_notes_reach_nothing_outside_dataset_files(world):
    store, _, record, signer = world
    forge = URLSafeTimedSerializer(store.signing_key(), salt="raybatch-file-url")
    for note in (
        {"op": "get", "key": record.key_id, "path": "service/signing-key"},
        {"op": "get", "key": record.key_id, "path": f"keys/{record.key_id}.json"},
        {"op": "get", "key": record.key_id, "path": "accounts/acme/datasets/d/files/../../../../keys/x.jsonl"},
        {"op": "get", "key": record.key_id, "path": "/etc/passwd"},
        {"op": "get", "key": record.key_id, "path": "accounts/other/datasets/d/files/a.jsonl"},
        {"op": "put", "key": record.key_id, "account": "acme", "dataset": "d", "nonce": "0" * 32, "file": "../../x.jsonl", "size": 1},
        {"op": "put", "key": record.key_id, "account": "acme", "dataset": "../keys", "nonce": "0" * 32, "file": "a.jsonl", "size": 1},
        {"op": "put", "key": record.key_id, "account": "other", "dataset": "d", "nonce": "0" * 32, "file": "a.jsonl", "size": 1},
        {"op": "put", "key": record.key_id, "path": "keys/x.json", "size": 1},
    ):
        with pytest.raises(NotFound):
            signer.open(forge.dumps(note), note["op"])
