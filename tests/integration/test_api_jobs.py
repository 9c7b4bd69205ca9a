"""Jobs over time, on the deterministic scripted engine (1 s a row, one or two at a time) so
that "mid-run" is a known moment: cancel and expiry keep partial results, a
continuation runs exactly the rest, and a restart of the Serve app or of the scheduler
mid-job loses nothing."""

from __future__ import annotations

import time

import pytest
import ray

from raybatch.resources import JobRecord
from tests.helpers import InputBuilder, chat, check_run, dataset_files_url, read_jsonl, sdk_client, wait_job, wait_until

ACCOUNT = "jobs"


def _upload(client, tmp_path, dataset_id: str, lines: int, bad_every: int = 0) -> InputBuilder:
    built = InputBuilder()
    for i in range(lines):
        if bad_every and i % bad_every == bad_every - 1:
            built.add("input.jsonl", {"custom_id": f"row-{i}", "body": {"messages": "not a list"}}, f"row-{i}", "invalid_request")
        else:
            built.ok("input.jsonl", f"row-{i}", chat(f"line {i}", max_tokens=32))
    built.write(str(tmp_path / dataset_id))
    client.datasets.create(dataset_id=dataset_id, dataset={"user_uploaded": {}})
    client.datasets.upload(dataset_id, file=("input.jsonl", (tmp_path / dataset_id / "input.jsonl").read_bytes()))
    return built


def _wait_progress(client, job_id: str, processed: int, timeout: float = 120) -> None:
    wait_until(
        lambda: client.batch_inference_jobs.get(job_id).job_progress.total_processed_requests >= processed,
        timeout=timeout, interval=0.3, message=f"{job_id} made no progress",
    )


def _output(service, job) -> str:
    return dataset_files_url(service.storage, ACCOUNT, job.output_dataset_id)


def _record(service, job_id: str) -> JobRecord:
    from raybatch.store import Store

    return Store(service.storage).get_job(ACCOUNT, job_id)


@pytest.fixture(scope="module")
def client(service):
    return sdk_client(service.base_url, service.key(ACCOUNT), ACCOUNT)


def test_cancel_mid_run_keeps_partial_results_and_a_continuation_does_exactly_the_rest(client, service, tmp_path):
    built = _upload(client, tmp_path, "to-cancel", 40, bad_every=5)
    client.batch_inference_jobs.create(batch_inference_job_id="cancel-me", model="scripted-slow", input_dataset_id="to-cancel")
    _wait_progress(client, "cancel-me", 2)
    asked = time.monotonic()
    cancelling = client.post(f"/v1/accounts/{ACCOUNT}/batchInferenceJobs/cancel-me:cancel", cast_to=object)
    assert cancelling["state"] == "JOB_STATE_CANCELLING"
    job, _ = wait_job(client, "cancel-me", timeout=60)
    assert job.state == "JOB_STATE_CANCELLED" and job.status.code == "CANCELLED"
    assert time.monotonic() - asked < 30
    output = _output(service, job)
    check_run(output, built.expected, complete=False)
    parent_results = read_jsonl(f"{output}/results.jsonl")
    parent_errors = read_jsonl(f"{output}/errors.jsonl")
    processed = len(parent_results) + len(parent_errors)
    assert 2 <= processed < 40 and job.job_progress.total_processed_requests == processed
    assert client.datasets.get(job.output_dataset_id.rsplit("/", 1)[-1]).state == "READY"

    # The continuation: parent's model, input and parameters unless given; here a faster model.
    child = client.batch_inference_jobs.create(
        batch_inference_job_id="cancel-me-rest",
        continued_from_job_name=f"accounts/{ACCOUNT}/batchInferenceJobs/cancel-me",
        model="scripted",
    )
    assert child.input_dataset_id == f"accounts/{ACCOUNT}/datasets/to-cancel"
    assert child.continued_from_job_name == f"accounts/{ACCOUNT}/batchInferenceJobs/cancel-me"
    child, _ = wait_job(client, "cancel-me-rest", timeout=120)
    assert child.state == "JOB_STATE_COMPLETED", child.status
    rest = _output(service, child)
    results, errors = read_jsonl(f"{rest}/results.jsonl"), read_jsonl(f"{rest}/errors.jsonl")
    succeeded_before = {r["custom_id"] for r in parent_results}
    # Exactly the lines that did not succeed: never-processed ones and the error rows.
    assert succeeded_before.isdisjoint(r["custom_id"] for r in results)
    assert len(results) + len(errors) == 40 - len(succeeded_before)
    assert child.job_progress.total_input_requests == 40 - len(succeeded_before)
    everything = succeeded_before | {r["custom_id"] for r in results}
    assert everything == {e.custom_id for e in built.expected if e.error is None}
    assert sorted(r["error"]["line"] for r in errors) == [e.line for e in built.expected if e.error]


def test_expiry_keeps_partial_results(client, service, tmp_path):
    built = _upload(client, tmp_path, "to-expire", 80)
    client.batch_inference_jobs.create(
        batch_inference_job_id="short-lived", model="scripted-slow", input_dataset_id="to-expire",
        extra_body={"maxDuration": "25s"},
    )
    job, seen = wait_job(client, "short-lived", timeout=120)
    assert job.state == "JOB_STATE_EXPIRED" and "time limit of 25s" in job.status.message
    assert "JOB_STATE_RUNNING" in seen
    output = _output(service, job)
    check_run(output, built.expected, complete=False)
    processed = len(read_jsonl(f"{output}/results.jsonl"))
    assert 0 < processed < 80 and job.job_progress.total_processed_requests == processed


def _scheduler(service):
    from raybatch.jobs.scheduler import NAMESPACE, scheduler_name

    return ray.get_actor(scheduler_name(service.storage), namespace=NAMESPACE)


def test_restarting_the_serve_app_and_the_scheduler_mid_job_loses_nothing(client, service, tmp_path, tiny_model):
    from ray import serve

    from raybatch.config import ServiceConfig
    from raybatch.runner import ensure_ray
    from raybatch.service import APP_NAME, deploy
    from tests.helpers import service_config

    built = _upload(client, tmp_path, "to-survive", 40)
    client.batch_inference_jobs.create(batch_inference_job_id="survivor", model="scripted-slow", input_dataset_id="to-survive")
    _wait_progress(client, "survivor", 3)
    ensure_ray()
    serve.delete(APP_NAME)  # every API replica gone
    ray.kill(_scheduler(service), no_restart=False)  # Ray restarts it; it reloads from the store
    port = int(service.base_url.rsplit(":", 1)[1])
    deploy(ServiceConfig.model_validate(service_config(service.storage, tiny_model)), "127.0.0.1", port)
    job, _ = wait_job(client, "survivor", timeout=120)
    assert job.state == "JOB_STATE_COMPLETED", job.status
    check_run(_output(service, job), built.expected)
    assert _record(service, "survivor").runtime.attempts == 1  # its driver went on untouched


def test_a_scheduler_that_dies_mid_publish_is_restarted_and_finishes_the_publish(client, service, faults, tmp_path):
    """publish.crash: the scheduler's process exits in the middle of publishing a
    finished job (both files written, published.json not yet). Ray restarts it; it finds
    the job WRITING_RESULTS in the store and publishes again: every line once, the
    parts removed, no second attempt of the job."""
    import os

    built = _upload(client, tmp_path, "to-publish", 40, bad_every=7)
    faults.arm("publish.crash", after=2)
    client.batch_inference_jobs.create(batch_inference_job_id="publish-crash", model="scripted", input_dataset_id="to-publish")
    job, _ = wait_job(client, "publish-crash", timeout=180)
    assert job.state == "JOB_STATE_COMPLETED", job.status
    assert faults.fired("publish.crash")
    with pytest.raises(ProcessLookupError):
        os.kill(faults.fired_in("publish.crash"), 0)  # the process that published first is gone
    check_run(_output(service, job), built.expected)
    parts = os.path.join(_output(service, job), "_raybatch", "parts")
    assert not os.path.exists(parts) or os.listdir(parts) == []  # no second copy of the output
    assert _record(service, "publish-crash").runtime.attempts == 1


@pytest.mark.parametrize("model,lines", [("scripted-slow", 40), pytest.param("tiny", 1000, marks=pytest.mark.engine)])
def test_a_dead_driver_is_requeued_and_resumes_from_committed_parts(client, service, ray_cluster, tmp_path, model, lines):
    from ray.job_submission import JobSubmissionClient

    job_id = f"resumer-{model}"
    built = _upload(client, tmp_path, f"to-resume-{model}", lines)
    client.batch_inference_jobs.create(batch_inference_job_id=job_id, model=model, input_dataset_id=f"to-resume-{model}")
    _wait_progress(client, job_id, 4, timeout=300)
    driver = _record(service, job_id).runtime.driver_id
    assert JobSubmissionClient().stop_job(driver)  # the driver dies without an outcome, mid-job
    job, seen = wait_job(client, job_id, timeout=600)
    assert job.state == "JOB_STATE_COMPLETED", job.status
    assert _record(service, job_id).runtime.attempts == 2
    check_run(_output(service, job), built.expected)


def test_validation_fails_jobs_with_a_clear_message(client, service, tmp_path):
    _upload(client, tmp_path, "valid-input", 2)
    client.datasets.create(dataset_id="never-uploaded", dataset={"user_uploaded": {}})
    cases = {
        "not-ready": ({"model": "scripted", "input_dataset_id": "never-uploaded"}, "is UPLOADING, not READY"),
        "fp8-on-cpu": ({"model": "tiny", "input_dataset_id": "valid-input", "precision": "FP8"}, "precision FP8 cannot be served"),
        "no-model": ({"model": "no-files", "input_dataset_id": "valid-input"}, "no config.json"),
    }
    for job_id, (fields, _) in cases.items():
        client.batch_inference_jobs.create(batch_inference_job_id=job_id, **fields)
    for job_id, (_, message) in cases.items():
        job, seen = wait_job(client, job_id, timeout=60)
        assert job.state == "JOB_STATE_FAILED" and message in job.status.message, (job_id, job.status)
        assert seen[0] in ("JOB_STATE_VALIDATING", "JOB_STATE_FAILED") and "JOB_STATE_RUNNING" not in seen


def test_delete_cancels_a_running_job_and_keeps_its_output(client, service, tmp_path):
    _upload(client, tmp_path, "to-delete", 40)
    client.batch_inference_jobs.create(batch_inference_job_id="delete-me", model="scripted-slow", input_dataset_id="to-delete")
    _wait_progress(client, "delete-me", 2)
    asked = time.monotonic()
    client.batch_inference_jobs.delete("delete-me")
    # At once: the job is cancelled in the background (its driver takes seconds to stop).
    assert time.monotonic() - asked < 3
    from fireworks import NotFoundError

    with pytest.raises(NotFoundError):
        client.batch_inference_jobs.get("delete-me")
    assert "delete-me" not in {j.name.rsplit("/", 1)[-1] for j in client.batch_inference_jobs.list()}
    with pytest.raises(NotFoundError):
        client.batch_inference_jobs.delete("delete-me")
    # Once it has stopped, its record is gone from the store and its output is whole.
    from raybatch.store import Store

    wait_until(lambda: Store(service.storage).get_job(ACCOUNT, "delete-me") is None, timeout=60,
               message="the deleted job's record outlived its stop")
    output = client.datasets.get("delete-me-output")
    assert output.state == "READY" and 2 <= int(output.example_count) < 40


def test_list_filters_by_state_and_orders_by_create_time(client):
    everything = list(client.batch_inference_jobs.list())
    names = [j.name for j in everything]
    assert names == sorted(names, key=lambda n: [j.create_time for j in everything if j.name == n][0])
    newest_first = list(client.batch_inference_jobs.list(order_by="createTime desc"))
    assert [j.name for j in newest_first] == names[::-1]
    failed = list(client.batch_inference_jobs.list(filter="state=JOB_STATE_FAILED"))
    assert failed and all(j.state == "JOB_STATE_FAILED" for j in failed)
    ended = client.batch_inference_jobs.list(filter='state="JOB_STATE_FAILED" OR state="JOB_STATE_COMPLETED"')
    assert {j.state for j in ended.batch_inference_jobs} == {"JOB_STATE_FAILED", "JOB_STATE_COMPLETED"}
    assert ended.to_dict()["totalSize"] == len([j for j in everything if j.state in ("JOB_STATE_FAILED", "JOB_STATE_COMPLETED")])


def test_datasets_update_and_delete(client, tmp_path):
    _upload(client, tmp_path, "to-edit", 1)
    updated = client.datasets.update("to-edit", display_name="renamed")
    assert updated.display_name == "renamed" and client.datasets.get("to-edit").display_name == "renamed"
    client.datasets.delete("to-edit")
    from fireworks import NotFoundError

    with pytest.raises(NotFoundError):
        client.datasets.get("to-edit")


def test_two_continuations_of_one_parent_at_once_exactly_one_proceeds(client, service, tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    from fireworks import ConflictError

    _upload(client, tmp_path, "twice-continued", 4)
    client.batch_inference_jobs.create(batch_inference_job_id="parent", model="scripted", input_dataset_id="twice-continued")
    wait_job(client, "parent", timeout=120)

    def continue_parent(job_id: str):
        try:
            return client.batch_inference_jobs.create(
                batch_inference_job_id=job_id, continued_from_job_name="parent"
            )
        except ConflictError as error:
            return error

    with ThreadPoolExecutor(2) as pool:
        outcomes = list(pool.map(continue_parent, ["child-a", "child-b"]))
    refused = [o for o in outcomes if isinstance(o, ConflictError)]
    created = [o for o in outcomes if not isinstance(o, ConflictError)]
    assert len(refused) == 1 and len(created) == 1
    assert "already continued by" in str(refused[0])
    job, _ = wait_job(client, created[0].name.rsplit("/", 1)[-1], timeout=120)
    assert job.state == "JOB_STATE_COMPLETED" and job.job_progress.total_input_requests == 0
