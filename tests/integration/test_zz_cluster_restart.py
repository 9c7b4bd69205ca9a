"""The whole Ray cluster stopped mid-job and started again: `raybatch down` then `up`,
and `ray stop --force` then `up`. The job resumes by itself and finishes without
answering again any line that was committed (the scripted engine records every call).

Named to run last: it stops the session's cluster (and brings it back)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from tests.helpers import InputBuilder, check_run, dataset_files_url, invocations, sdk_client, wait_job
from tests.integration.test_run_engine import chat

ACCOUNT = "restart"


def _cli(service, *args):
    env = {**os.environ, "RAYBATCH_HOME": service.home}
    env.pop("RAY_ADDRESS", None)
    done = subprocess.run([sys.executable, "-m", "raybatch.cli", *args], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def _committed_ids(output: str) -> set[str]:
    ids = set()
    commits = os.path.join(output, "_raybatch", "commits")
    for name in os.listdir(commits):
        record = json.loads(open(os.path.join(commits, name)).read())
        if record["results_file"]:
            ids |= {json.loads(line)["custom_id"] for line in open(os.path.join(output, record["results_file"]))}
    return ids


@pytest.mark.parametrize(
    "stop,model",
    [("raybatch down", "scripted-counted"), ("ray stop --force", "scripted-counted"), ("ray stop --force", "tiny")],
)
def test_job_resumes_after_the_cluster_restarts(service, tmp_path, stop, model):
    import ray

    from tests.conftest import SERVICE_MODELS  # noqa: F401  (the catalog the service runs with)

    job_id = f"across-{stop.split()[0]}-{model.split('-')[0]}"
    lines = 30 if model != "tiny" else 1000  # vLLM is fast: enough lines to stop it mid-job
    key = service.key(ACCOUNT)
    client = sdk_client(service.base_url, key, ACCOUNT)
    built = InputBuilder()
    for i in range(lines):
        built.ok("in.jsonl", f"{job_id}-{i}", chat(f"line {i}", max_tokens=64, temperature=0))  # unique: one calls folder for all
    built.write(str(tmp_path))
    dataset_id = f"in-{job_id}"
    client.datasets.create(dataset_id=dataset_id, dataset={"user_uploaded": {}})
    client.datasets.upload(dataset_id, file=("in.jsonl", (tmp_path / "in.jsonl").read_bytes()))
    client.batch_inference_jobs.create(batch_inference_job_id=job_id, model=model, input_dataset_id=dataset_id)
    output = dataset_files_url(service.storage, ACCOUNT, f"{job_id}-output")
    deadline = time.monotonic() + 120
    while not os.path.isdir(os.path.join(output, "_raybatch", "commits")) or len(_committed_ids(output)) < 3:
        assert time.monotonic() < deadline, "no commits"
        time.sleep(0.3)

    ray.shutdown()  # this process leaves the cluster before it goes
    if stop == "raybatch down":
        _cli(service, "down")
    else:
        subprocess.run([os.path.join(os.path.dirname(sys.executable), "ray"), "stop", "--force"], capture_output=True, timeout=120)
    committed_before = _committed_ids(output)
    calls_before = invocations(os.path.join(service.home, "calls")) if model != "tiny" else {}
    port = service.base_url.rsplit(":", 1)[1]
    started = time.monotonic()
    _cli(service, "up", "--port", port, "--config", os.path.join(service.home, "service.json"), "--num-cpus", "4")

    job, seen = wait_job(client, job_id, timeout=300)
    recovery = time.monotonic() - started
    print(f"{stop}: up again and finished in {recovery:.1f}s")
    assert job.state == "JOB_STATE_COMPLETED", job.status
    check_run(output, built.expected)
    assert len(committed_before) < lines, "the job ended before the stop: nothing was tested"
    calls = invocations(os.path.join(service.home, "calls")) if model != "tiny" else {}
    for custom_id in committed_before if model != "tiny" else ():  # vLLM keeps no call record  # committed before the stop: never answered again
        assert len(calls[custom_id]) == len(calls_before[custom_id]) == 1, custom_id
    from raybatch.store import Store

    assert Store(service.storage).get_job(ACCOUNT, job_id).runtime.attempts == 2
