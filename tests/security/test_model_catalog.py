"""Issue 10, item 1: a tenant cannot make the service load a model outside its catalog.
Each attack goes through the real HTTP API of the running service."""

from __future__ import annotations

import json

import httpx
import pytest

from raybatch.store import Store
from tests.helpers import catalog_listing, wait_until

ACCOUNT = "attacker"
SERVED = catalog_listing()
LINE = json.dumps({"custom_id": "a", "body": {"messages": [{"role": "user", "content": "hi"}]}}).encode() + b"\n"


def _call(service, key, method, path, **kwargs) -> httpx.Response:
    return httpx.request(method, f"{service.base_url}/v1/accounts/{path}", headers={"Authorization": f"Bearer {key}"},
                         timeout=60, **kwargs)


def _dataset(service, key, account: str, dataset_id: str) -> None:
    assert _call(service, key, "POST", f"{account}/datasets", json={"datasetId": dataset_id, "dataset": {"userUploaded": {}}}).status_code == 200
    reply = _call(service, key, "POST", f"{account}/datasets/{dataset_id}:upload", files={"file": ("in.jsonl", LINE)})
    assert reply.status_code == 200, reply.text


def _create(service, key, account: str, job_id: str, **body) -> httpx.Response:
    return _call(service, key, "POST", f"{account}/batchInferenceJobs", params={"batchInferenceJobId": job_id}, json=body)


@pytest.fixture(scope="module")
def attacker(service):
    key = service.key(ACCOUNT)
    _dataset(service, key, ACCOUNT, "in")
    return key


@pytest.mark.parametrize("model", ["attacker-org/evil-model", "/etc", "../../models/tiny", "Tiny", "file:///srv/models/x",
                                   "accounts/fireworks/models/deepseek-v3"])
def test_a_model_outside_the_catalog_is_refused_at_create_and_nothing_is_written(service, attacker, model):
    reply = _create(service, attacker, ACCOUNT, "evil", model=model, inputDatasetId="in")
    assert reply.status_code == 400
    message = f"model {model!r} is not served here; models served: {SERVED}"
    assert reply.json() == {"code": 3, "message": message, "details": [],
                            "error": {"code": 400, "status": "INVALID_ARGUMENT", "message": message}}
    # No job record and no output dataset: the refusal came before any write.
    assert _call(service, attacker, "GET", f"{ACCOUNT}/batchInferenceJobs/evil").status_code == 404
    assert _call(service, attacker, "GET", f"{ACCOUNT}/datasets/evil-output").status_code == 404
    assert Store(service.storage).get_job(ACCOUNT, "evil") is None


def test_an_account_with_an_allowlist_gets_only_its_models(service):
    account = "catalog-restricted"
    key = service.key(account)
    _dataset(service, key, account, "in")
    refused = _create(service, key, account, "want-tiny", model="tiny", inputDatasetId="in")
    assert refused.status_code == 400 and refused.json()["error"] == {
        "code": 400, "status": "INVALID_ARGUMENT",
        "message": f"model 'tiny' is not available to account {account!r}; models served to account {account!r}: scripted"}
    outside = _create(service, key, account, "want-hub", model="org/x", inputDatasetId="in")
    assert outside.json()["error"]["message"] == (
        f"model 'org/x' is not served here; models served to account {account!r}: scripted")
    assert _create(service, key, account, "allowed", model="scripted", inputDatasetId="in").status_code == 200


def test_a_continuation_inherits_its_parents_model_and_passes_the_same_check(service, attacker):
    """A parent whose model is no longer served (created under allow_any_model, or before
    the catalog changed) cannot be continued into loading that model."""
    assert _create(service, attacker, ACCOUNT, "parent", model="scripted", inputDatasetId="in").status_code == 200
    wait_until(
        lambda: _call(service, attacker, "GET", f"{ACCOUNT}/batchInferenceJobs/parent").json()["state"] == "JOB_STATE_COMPLETED",
        timeout=120, interval=0.5, message="the parent job did not complete",
    )
    store = Store(service.storage)
    record = store.get_job(ACCOUNT, "parent")
    record.job.model = "attacker-org/evil-model"
    store.put_job(record)
    reply = _create(service, attacker, ACCOUNT, "child", continuedFromJobName=f"accounts/{ACCOUNT}/batchInferenceJobs/parent")
    assert reply.status_code == 400 and reply.json()["error"]["message"] == (
        f"model 'attacker-org/evil-model' is not served here; models served: {SERVED}")
    assert store.get_job(ACCOUNT, "child") is None
