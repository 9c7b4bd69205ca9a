"""Faults injected into a running job, each followed by the invariant checker: every
input line exactly once in results ∪ errors, no torn lines, jobProgress equal to the
files. The deterministic scripted engine makes "mid-job" a known moment; the same
faults run on the real vLLM engine in test_faults_vllm.py."""

from __future__ import annotations

import time

import pytest

from raybatch.config import RunConfig
from raybatch.runner import run_job
from tests.helpers import InputBuilder, check_run, invocations
from tests.integration.test_run_engine import chat

LINES = 60


def _input(tmp_path) -> tuple[str, InputBuilder]:
    built = InputBuilder()
    for i in range(LINES):
        built.ok("in.jsonl", f"row-{i}", chat(f"line {i}"))
    built.write(str(tmp_path / "in"))
    return str(tmp_path / "in"), built


def _config(tmp_path, replicas: int = 1, **engine_args) -> RunConfig:
    source, _ = str(tmp_path / "in"), None
    return RunConfig(
        input=source,
        output=str(tmp_path / "out"),
        model="scripted",
        part_max_rows=5,
        part_max_seconds=0.5,
        engine={
            "kind": "scripted",
            "replicas": replicas,
            "batch_size": 2,
            "concurrent_batches": 2,
            "request_timeout_seconds": 5,
            "engine_args": {
                "seconds_per_request": 0.05,
                "invocations_dir": str(tmp_path / "calls"),
                "fault_marker": str(tmp_path / "fault-happened"),
                **engine_args,
            },
        },
    )


@pytest.mark.parametrize("replicas", [1, 2])
@pytest.mark.parametrize("fault", ["kill", "die", "hang"])
def test_engine_faults_replace_the_engine_and_lose_nothing(ray_cluster, tmp_path, fault, replicas):
    """kill: the engine actor's process SIGKILLed; die: the engine dead while its actor
    lives (EngineFailure, as vLLM's EngineDeadError becomes); hang: an engine that never
    answers, caught by the request timeout (5 s here)."""
    _, built = _input(tmp_path)
    started = time.monotonic()
    summary = run_job(_config(tmp_path, replicas, fault=fault, fault_after=10))
    assert summary.state == "completed"
    assert (tmp_path / "fault-happened").exists()
    check_run(str(tmp_path / "out"), built.expected)
    calls = invocations(tmp_path / "calls")
    assert set(calls) == {f"row-{i}" for i in range(LINES)}
    engines = {pid for pids in calls.values() for pid in pids}
    assert len(engines) >= replicas + 1  # the broken engine was replaced, not reused
    assert time.monotonic() - started < 120  # bounded: no silent hang


def test_writer_killed_between_part_and_commit(ray_cluster, tmp_path, monkeypatch):
    _, built = _input(tmp_path)
    config = _config(tmp_path)
    monkeypatch.setenv("RAYBATCH_FAULT_WRITER_CRASH", f"3:{tmp_path / 'writer-crashed'}")
    with pytest.raises(Exception):
        run_job(config)  # the run stops: its writer, and that writer's buffer, are gone
    assert (tmp_path / "writer-crashed").exists()
    parts = sorted((tmp_path / "out" / "_raybatch" / "parts").iterdir())
    commits = sorted((tmp_path / "out" / "_raybatch" / "commits").iterdir())
    assert len(commits) == 2 and len(parts) > len(commits)  # part 3 written, never committed
    before = invocations(tmp_path / "calls")
    committed = check_run_partial_ids(tmp_path)
    summary = run_job(config)  # the same command again resumes
    assert summary.state == "completed"
    check_run(str(tmp_path / "out"), built.expected)
    after = invocations(tmp_path / "calls")
    for custom_id in committed:  # nothing committed is answered again
        assert len(after[custom_id]) == len(before[custom_id]) == 1


def check_run_partial_ids(tmp_path) -> set[str]:
    """custom_ids in the committed parts of an output, read from the commit records."""
    import json

    out = tmp_path / "out" / "_raybatch"
    ids = set()
    for commit in (out / "commits").iterdir():
        record = json.loads(commit.read_text())
        for part in (record["results_file"], record["errors_file"]):
            if part:
                ids |= {json.loads(line)["custom_id"] for line in (tmp_path / "out" / part).read_text().splitlines()}
    return ids
