"""The firectl-style CLI against the real service: create a dataset from a file, start
a job and wait for it, list, download; exit codes a script can rely on."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.helpers import InputBuilder, chat, read_jsonl

ACCOUNT = "cli"


def _cli(service, key, *args, check=True, account=ACCOUNT) -> subprocess.CompletedProcess:
    env = {"RAYBATCH_BASE_URL": service.base_url, "RAYBATCH_API_KEY": key, "RAYBATCH_ACCOUNT": account}
    import os

    done = subprocess.run([sys.executable, "-m", "raybatch.cli", *args], env={**os.environ, **env},
                          capture_output=True, text=True, timeout=300)
    if check:
        assert done.returncode == 0, done.stderr
    return done


def test_dataset_job_and_download_through_the_cli(service, tmp_path):
    key = service.key(ACCOUNT)
    built = InputBuilder()
    for i in range(4):
        built.ok("in.jsonl", f"cli-{i}", chat(f"hello {i}"))
    built.write(str(tmp_path))
    created = json.loads(_cli(service, key, "dataset", "create", "cli-in", "--file", str(tmp_path / "in.jsonl")).stdout)
    assert created["state"] == "READY" and created["exampleCount"] == "4"
    _cli(service, key, "dataset", "create", "cli-signed", "--file", str(tmp_path / "in.jsonl"), "--signed-upload")
    job = json.loads(_cli(service, key, "job", "create", "--job-id", "cli-job", "--model", "scripted",
                          "--input-dataset-id", "cli-signed", "--max-tokens", "4", "--wait").stdout)
    assert job["state"] == "JOB_STATE_COMPLETED" and job["jobProgress"]["successfullyProcessedRequests"] == 4
    assert job["inferenceParameters"]["maxTokens"] == 4
    listing = _cli(service, key, "job", "list").stdout
    assert "cli-job" in listing and "JOB_STATE_COMPLETED" in listing
    _cli(service, key, "dataset", "download", "cli-job-output", "--output-dir", str(tmp_path / "out"))
    results = read_jsonl(str(tmp_path / "out" / "results.jsonl"))
    assert sorted(r["custom_id"] for r in results) == [f"cli-{i}" for i in range(4)]


def test_cli_exit_codes(service):
    key = service.key(ACCOUNT)
    missing = _cli(service, key, "job", "get", "no-such-job", check=False)
    assert missing.returncode == 4 and "404 NOT_FOUND" in missing.stderr
    refused = _cli(service, "rbk_k000000000000_" + "x" * 43, "dataset", "list", check=False)
    assert refused.returncode == 4 and "401 UNAUTHENTICATED" in refused.stderr
    failed = _cli(service, key, "job", "create", "--model", "no-files", "--input-dataset-id", "cli-in", "--wait", check=False)
    assert failed.returncode == 1 and "JOB_STATE_FAILED" in failed.stdout and "config.json" in failed.stdout
    outside = _cli(service, key, "job", "create", "--model", "/no/such/model", "--input-dataset-id", "cli-in", check=False)
    assert outside.returncode == 4 and "400 INVALID_ARGUMENT: model '/no/such/model' is not served here" in outside.stderr


def test_engines_lists_the_pools_replicas_for_an_admin_only(service):
    listed = json.loads(_cli(service, service.key("admin"), "engines", "--json", account="admin").stdout)
    assert isinstance(listed, list)
    for replica in listed:
        assert {"replicaId", "model", "precisionKey", "state", "rowsInFlight", "rowsQueued"} <= replica.keys()
        assert replica["state"] in ("starting", "ready", "draining")
    assert _cli(service, service.key("admin"), "engines", account="admin").stdout.startswith("REPLICA")
    refused = _cli(service, service.key(ACCOUNT), "engines", check=False)
    assert refused.returncode == 4 and "403 PERMISSION_DENIED" in refused.stderr


def test_firectl_forms_end_to_end(service, tmp_path):
    """A firectl user's session, spelled as firectl spells it, against the service."""
    key = service.key(ACCOUNT)
    built = InputBuilder()
    for i in range(3):
        built.ok("in.jsonl", f"fc-{i}", chat(f"hi {i}"))
    built.write(str(tmp_path))
    created = json.loads(_cli(service, key, "create", "dataset", "fc-in", str(tmp_path / "in.jsonl")).stdout)
    assert created["state"] == "READY" and created["exampleCount"] == "3"
    job = json.loads(_cli(service, key, "create", "batch-inference-job", "-m", "scripted", "-d", "fc-in",
                          "-x", "fc-out", "--job-id", "fc-job", "--max-tokens", "4", "--top-k", "5", "--wait").stdout)
    assert job["state"] == "JOB_STATE_COMPLETED" and job["jobProgress"]["successfullyProcessedRequests"] == 3
    assert job["inferenceParameters"] == {"maxTokens": 4, "topK": 5}
    assert job["outputDatasetId"].rsplit("/", 1)[-1] == "fc-out"
    assert json.loads(_cli(service, key, "get", "batch-inference-job", "fc-job").stdout)["name"] == job["name"]
    assert "fc-job" in _cli(service, key, "list", "batch-inference-jobs").stdout
    datasets = _cli(service, key, "list", "datasets").stdout
    assert "datasets/fc-in" in datasets and "datasets/fc-out" in datasets

    _cli(service, key, "download", "dataset", "fc-out", "--output-dir", str(tmp_path / "out"))
    results = read_jsonl(str(tmp_path / "out" / "results.jsonl"))
    assert sorted(r["custom_id"] for r in results) == ["fc-0", "fc-1", "fc-2"]

    # Nothing is left to run: the continuation completes at once, with the parent's model.
    follow = json.loads(_cli(service, key, "create", "batch-inference-job", "--continue-from", "fc-job",
                             "--job-id", "fc-next", "--wait").stdout)
    assert follow["state"] == "JOB_STATE_COMPLETED" and follow["continuedFromJobName"] == job["name"]

    assert _cli(service, key, "delete", "batch-inference-job", "fc-next").stdout.strip() == "deleted job fc-next"
    assert _cli(service, key, "get", "batch-inference-job", "fc-next", check=False).returncode == 4
    assert _cli(service, key, "delete", "dataset", "fc-in").stdout.strip() == "deleted dataset fc-in"
