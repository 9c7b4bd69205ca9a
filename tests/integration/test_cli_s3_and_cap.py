"""The `raybatch run` command against S3 (moto's server), joining the session's Ray
cluster through RAY_ADDRESS as `ray job submit -- raybatch run ...` would; and the
output cap stopping a run, then a re-run finishing it without a line twice."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import boto3
import pytest
import ray

from raybatch.config import RunConfig
from raybatch.engines.pool_handle import pool_name
from raybatch.runner import run_job
from tests.helpers import ENGINE, InputBuilder, MAX_LINE_BYTES, chat, check_run, mixed_input, read_jsonl

pytestmark = pytest.mark.engine


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "RAY_ADDRESS": os.environ.get("RAY_ADDRESS") or ray.get_runtime_context().gcs_address}
    return subprocess.run(
        [sys.executable, "-m", "raybatch.cli", *args], env=env, capture_output=True, text=True, timeout=600
    )


@pytest.fixture(scope="module")
def bucket(s3_endpoint):
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket="raybatch-test")
    return "s3://raybatch-test"


def test_cli_runs_a_job_on_s3(bucket, ray_cluster, tiny_model, tmp_path):
    builder = mixed_input()
    builder.write(f"{bucket}/mixed/in")
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"max_line_bytes": MAX_LINE_BYTES, "part_max_rows": 7, "engine": ENGINE.model_dump()}))
    done = _cli(
        "run", "--input", f"{bucket}/mixed/in/", "--output", f"{bucket}/mixed/out",
        "--model", tiny_model, "--max-tokens", "16", "--temperature", "0.8", "--config", str(config),
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = builder.lines()
    succeeded = sum(1 for e in lines if e.error is None)
    assert (
        f"completed: {len(lines)}/{len(lines)} lines ({succeeded} succeeded, "
        f"{len(lines) - succeeded} failed, 2 blank skipped)"
    ) in done.stdout
    assert re.search(r"\d+ output tokens/s, \d+ input tokens/s", done.stdout), done.stdout
    rows = check_run(f"{bucket}/mixed/out", builder.expected)
    assert {r["custom_id"] for r in read_jsonl(f"{bucket}/mixed/out/results.jsonl")} == set(rows)
    s3 = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket="raybatch-test", Prefix="mixed/out/")["Contents"]]
    assert not any(".tmp-" in key for key in keys)


def test_cli_refuses_a_precision_the_cluster_cannot_serve(bucket, ray_cluster, tiny_model, tmp_path):
    done = _cli(
        "run", "--input", "examples/requests.jsonl", "--output", str(tmp_path / "out"),
        "--model", tiny_model, "--precision", "FP8",
    )
    assert done.returncode == 2
    assert "precision FP8 cannot be served: this cluster has no GPU" in done.stderr
    assert not (tmp_path / "out").exists()


def test_cli_rejects_bad_settings(tmp_path):
    done = _cli("run", "--input", "x.jsonl", "--output", str(tmp_path), "--model", "m", "--temperature", "nan")
    assert done.returncode == 2 and "temperature" in done.stderr
    done = _cli("run", "--input", "x.jsonl", "--output", str(tmp_path), "--model", "m", "--precision", "FP7")
    assert done.returncode == 2 and "precision" in done.stderr


def test_output_cap_stops_the_run_and_a_rerun_finishes_it(ray_cluster, service, tiny_model, tmp_path):
    builder = InputBuilder()
    for i in range(40):
        builder.ok("in.jsonl", f"row-{i:02d}", chat(f"row {i}", max_tokens=8, ignore_eos=True))
    builder.add("in.jsonl", b"not json", None, "invalid_json")
    builder.write(str(tmp_path / "in"))
    cap = 6000  # about a dozen result lines
    config = RunConfig(
        input=str(tmp_path / "in"), output=str(tmp_path / "out"), model=tiny_model,
        output_cap_bytes=cap, part_max_rows=3, engine=ENGINE,
        engine_pool=pool_name(service.storage),  # the rerun finds the replica warm
    )
    capped = run_job(config)
    assert capped.state == "output_cap_reached"
    assert 0 < capped.status.committed_bytes <= cap
    # The published files are exactly the committed parts, within the cap.
    check_run(str(tmp_path / "out"), builder.expected, complete=False, cap_bytes=cap)
    processed = capped.status.progress.total_processed_requests
    assert 0 < processed < 41

    finished = run_job(config.model_copy(update={"output_cap_bytes": 10**9}))
    assert finished.state == "completed"
    assert finished.status.progress.total_processed_requests == 41
    check_run(str(tmp_path / "out"), builder.expected)
