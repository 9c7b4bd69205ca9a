"""The engine pool through the service: jobs of several accounts share replicas, rows
are interleaved by fair share, a warm replica serves the next job, cancel touches one
job only, and a replica's death or a poison row costs no job a line."""

from __future__ import annotations

import time

import httpx
import pytest

from raybatch.jobs.handoff import SPARE_DRIVER_PREFIX
from tests.helpers import InputBuilder, chat, check_run, dataset_files_url, invocations, read_jsonl, sdk_client, wait_job, wait_until

COMPLETED = {"JOB_STATE_COMPLETED"}


def _calls(service) -> dict:
    return invocations(f"{service.home}/pool-calls")


def _job(service, account: str, job_id: str, model: str, lines: int, tmp_path, poison_at: int = -1) -> InputBuilder:
    """Upload `lines` rows (custom_ids `<job_id>-<i>`) and create the job."""
    client = sdk_client(service.base_url, service.key(account), account)
    built = InputBuilder()
    for i in range(lines):
        custom_id = f"{job_id}-{i}"
        if i == poison_at:
            built.add("in.jsonl", {"custom_id": custom_id, "body": chat(f"line {i}")}, custom_id, "engine_error")
        else:
            built.ok("in.jsonl", custom_id, chat(f"line {i}", max_tokens=8))
    built.write(str(tmp_path / job_id))
    client.datasets.create(dataset_id=f"{job_id}-in", dataset={"user_uploaded": {}})
    client.datasets.upload(f"{job_id}-in", file=("in.jsonl", (tmp_path / job_id / "in.jsonl").read_bytes()))
    client.batch_inference_jobs.create(batch_inference_job_id=job_id, model=model, input_dataset_id=f"{job_id}-in")
    return built


def _check(service, account: str, job_id: str, built: InputBuilder, **kwargs) -> dict:
    client = sdk_client(service.base_url, service.key(account), account)
    job, _ = wait_job(client, job_id, timeout=300)
    assert job.state == "JOB_STATE_COMPLETED", job.status
    output = dataset_files_url(service.storage, account, job.output_dataset_id)
    return check_run(output, built.expected, progress=job.job_progress.model_dump(by_alias=True), **kwargs)


def _record(service, account: str, job_id: str):
    from raybatch.store import Store

    return Store(service.storage).get_job(account, job_id)


def _engines(service, account: str = "admin") -> httpx.Response:
    return httpx.get(f"{service.base_url}/v1/admin/engines",
                     headers={"Authorization": f"Bearer {service.key(account)}"}, timeout=30)


def test_two_accounts_share_a_replica_by_fair_share_not_by_job_count(service, faults, tmp_path):
    """Account `many` has three jobs, account `one` has one, all on one replica of 3
    slots. The engine is held shut until all four jobs have rows at the pool, then
    opened: `one` gets about half of the engine, not the quarter that first come, first
    served (or round robin over jobs) would give it."""
    faults.arm("engine.gate")
    jobs = [("many", f"fair-many-{n}") for n in range(3)] + [("one", "fair-one")]
    built = {job_id: _job(service, account, job_id, "scripted-fair", 30, tmp_path) for account, job_id in jobs}
    deadline = time.monotonic() + 240
    while True:  # every job keeps 6 rows at the pool (concurrent_batches 6 x 1 row)
        shared = [r for r in _engines(service).json()["replicas"] if r["model"] == "scripted-fair"]
        if shared and shared[0]["rowsInFlight"] + shared[0]["rowsQueued"] >= 4 * 6:
            break
        assert time.monotonic() < deadline, f"the four jobs did not all reach the pool: {shared}"
        time.sleep(0.5)
    opened = time.time()
    faults.clear()
    for account, job_id in jobs:
        _check(service, account, job_id, built[job_id])
    calls = sorted((c.at, cid) for cid, found in _calls(service).items() if cid.startswith("fair-")
                   for c in found if c.at >= opened)
    # Fair: 'one' gets 18 of the first 36 (no job has finished its 30 rows by then);
    # first come, first served or round robin over jobs would give it 9.
    first = [cid for _, cid in calls[:36]]
    share = sum(cid.startswith("fair-one-") for cid in first) / len(first)
    print(f"fair share: account 'one' (1 job) got {share:.0%} of the first {len(first)} rows, 'many' (3 jobs) the rest")
    assert 0.4 <= share <= 0.6


def test_cancel_aborts_one_job_and_leaves_the_other_whole(service, tmp_path):
    account = "pool-cancel"
    kept = _job(service, account, "keep-me", "scripted-shared-1", 60, tmp_path)
    # Long enough (about 20 s of engine time) that the cancel lands mid-job however soon
    # its first rows show: with 200, all had reached the engine once before the cancel.
    _job(service, account, "stop-me", "scripted-shared-1", 600, tmp_path)
    client = sdk_client(service.base_url, service.key(account), account)
    wait_until(lambda: client.batch_inference_jobs.get("stop-me").job_progress.total_processed_requests >= 5, timeout=120)
    client.post(f"/v1/accounts/{account}/batchInferenceJobs/stop-me:cancel", cast_to=object)
    cancelled_at = time.time()
    wait_job(client, "stop-me", until={"JOB_STATE_CANCELLED"}, timeout=60)
    _check(service, account, "keep-me", kept)
    late = [c for cid, found in _calls(service).items() if cid.startswith("stop-me-") for c in found
            if c.at > cancelled_at + 1.0]
    assert late == [], f"{len(late)} rows of the cancelled job reached the engine after cancel"
    stopped = sum(1 for cid in _calls(service) if cid.startswith("stop-me-"))
    assert stopped < 600


def test_a_replica_killed_with_two_jobs_rows_in_flight_loses_neither(service, faults, tmp_path):
    built = {
        "kill-a": _job(service, "pool-kill-a", "kill-a", "scripted-shared-2", 60, tmp_path),
        "kill-b": _job(service, "pool-kill-b", "kill-b", "scripted-shared-2", 60, tmp_path),
    }
    faults.arm("engine.kill", after=15)
    for job_id, lines in built.items():
        _check(service, f"pool-{job_id}", job_id, lines)
    assert faults.fired("engine.kill")
    engines = {c.pid for cid, found in _calls(service).items() if cid.startswith("kill-") for c in found}
    assert len(engines) >= 3  # two replicas, and the killed one replaced


def test_a_poison_row_in_one_job_does_not_stall_another(service, faults, tmp_path):
    """The poison row hangs every engine that answers it (3 s timeout here): it becomes
    an engine_error row after failing alone twice, while the other job, sharing the
    two replicas, goes on and completes."""
    faults.arm("engine.poison", custom_id="poisoned-7", fault="hang")
    poisoned = _job(service, "pool-poison", "poisoned", "scripted-shared-2", 30, tmp_path, poison_at=7)
    healthy = _job(service, "pool-healthy", "healthy", "scripted-shared-2", 60, tmp_path)
    _check(service, "pool-healthy", "healthy", healthy)
    _check(service, "pool-poison", "poisoned", poisoned)
    client = sdk_client(service.base_url, service.key("pool-poison"), "pool-poison")
    job = client.batch_inference_jobs.get("poisoned")
    output = dataset_files_url(service.storage, "pool-poison", job.output_dataset_id)
    [row] = read_jsonl(f"{output}/errors.jsonl")
    assert row["error"]["message"].startswith("the engine failed 2 times while answering this request alone")


@pytest.mark.parametrize("model, last_error", [
    ("scripted-broken", "RuntimeError: scripted engine refuses to start (fail_to_start)"),
    # Its start hangs: the start watchdog kills it after start_timeout_seconds (2 s).
    ("scripted-stuck", "not ready within 2s (start_timeout_seconds): its start hung"),
], ids=["fails", "hangs"])
def test_an_engine_that_cannot_start_fails_its_job_with_the_engines_error(service, tmp_path, model, last_error):
    account = f"pool-{model}"
    _job(service, account, "broken", model, 5, tmp_path)
    client = sdk_client(service.base_url, service.key(account), account)
    job, _ = wait_job(client, "broken", timeout=180)
    assert job.state == "JOB_STATE_FAILED"
    assert job.status.message == f"the engine for scripted failed to start 3 times; last error: {last_error}"
    assert _record(service, account, "broken").runtime.attempts == 1  # not retried: a setting
    # Every failed start was stopped: none is left holding its slot.
    assert not [r for r in _engines(service).json()["replicas"] if r["model"] == model]


def test_engines_are_listed_for_admins_only(service):
    assert _engines(service, "not-an-admin").status_code == 403
    assert _engines(service, "not-an-admin").json()["error"]["status"] == "PERMISSION_DENIED"
    reply = _engines(service)
    assert reply.status_code == 200
    replicas = reply.json()["replicas"]
    assert replicas, "the catalog's warm model has a replica"
    fields = {"replicaId", "model", "precisionKey", "node", "gpus", "acceleratorType", "state",
              "rowsInFlight", "rowsQueued", "idleSince"}
    assert all(set(r) == fields for r in replicas)
    assert {r["state"] for r in replicas} <= {"starting", "ready", "draining"}


@pytest.mark.engine
def test_a_second_job_finds_the_vllm_replica_warm(service, tmp_path):
    """`tiny` is kept warm (min_replicas 1): two jobs one after the other are answered by
    the same replica, and no engine starts for the second. Nor does a driver process:
    the second job runs in the first one's spare driver, taken back when it ended."""
    account = "pool-warm"
    first = _job(service, account, "warm-1", "tiny", 20, tmp_path)
    _check(service, account, "warm-1", first)
    before = [r for r in _engines(service).json()["replicas"] if r["model"] == "tiny"]
    second = _job(service, account, "warm-2", "tiny", 20, tmp_path)
    created = time.monotonic()
    client = sdk_client(service.base_url, service.key(account), account)
    wait_until(lambda: client.batch_inference_jobs.get("warm-2").job_progress.total_processed_requests != 0, timeout=120)
    print(f"second job's first row visible {time.monotonic() - created:.1f}s after create")
    _check(service, account, "warm-2", second)
    after = [r for r in _engines(service).json()["replicas"] if r["model"] == "tiny"]
    assert len(before) == 1 and before[0]["state"] == "ready"
    assert [r["replicaId"] for r in after] == [before[0]["replicaId"]]
    drivers = [_record(service, account, job_id).runtime.driver_id for job_id in ("warm-1", "warm-2")]
    assert drivers[0].startswith(SPARE_DRIVER_PREFIX) and drivers[1] == drivers[0], drivers


def test_rows_sharing_a_long_prefix_report_cached_tokens(service, tmp_path):
    """Prefix caching on the warm vLLM replica shows in the rows' usage and in
    jobProgress. The shared system prompt is longer than two of the CPU backend's
    default 128-token KV blocks: vLLM caches whole blocks only, so a shared prefix
    shorter than one block never counts as cached (docs/performance.md)."""
    account = "pool-prefix"
    system = "You are a careful assistant. Answer in plain prose and keep to the facts. " * 6
    built = InputBuilder()
    for i in range(12):
        body = {"messages": [{"role": "system", "content": system}, {"role": "user", "content": f"question {i}"}],
                "max_tokens": 4}
        built.add("in.jsonl", {"custom_id": f"prefix-{i}", "body": body}, f"prefix-{i}")
    built.write(str(tmp_path / "prefix"))
    client = sdk_client(service.base_url, service.key(account), account)
    client.datasets.create(dataset_id="prefix-in", dataset={"user_uploaded": {}})
    client.datasets.upload("prefix-in", file=("in.jsonl", (tmp_path / "prefix" / "in.jsonl").read_bytes()))
    client.batch_inference_jobs.create(batch_inference_job_id="prefix", model="tiny", input_dataset_id="prefix-in")
    _check(service, account, "prefix", built)
    job = client.batch_inference_jobs.get("prefix")
    output = dataset_files_url(service.storage, account, job.output_dataset_id)
    cached = [r["response"]["body"]["usage"]["prompt_tokens_details"]["cached_tokens"]
              for r in read_jsonl(f"{output}/results.jsonl")]
    assert sum(cached) > 0 and job.job_progress.cached_input_token_count == sum(cached), (cached, job.job_progress)
