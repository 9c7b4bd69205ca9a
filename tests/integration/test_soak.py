"""Soak: 20 rounds, each a fault injected at a random point of a job, each followed by
the invariant checker. Seeded: the seed is printed (and RAYBATCH_SOAK_SEED repeats a
soak). Faults: the engine actor SIGKILLed, the engine dead while its actor lives, the
engine hung (request timeout 3 s), the writer killed between a part and its commit.
Driver kills and whole-cluster restarts need the service and are tested on their own
(test_api_jobs.py, test_zz_cluster_restart.py)."""

from __future__ import annotations

import os
import random


from raybatch.config import RunConfig
from raybatch.runner import run_job
from tests.helpers import InputBuilder, check_run, invocations
from tests.integration.test_run_engine import chat

ROUNDS = 20
FAULTS = ("engine-kill", "engine-die", "engine-hang", "writer-crash")


def test_soak(ray_cluster, tmp_path, monkeypatch):
    seed = int(os.environ.get("RAYBATCH_SOAK_SEED") or random.SystemRandom().randrange(1 << 30))
    print(f"soak seed {seed} (RAYBATCH_SOAK_SEED={seed} repeats it)")
    rng = random.Random(seed)
    for round_number in range(ROUNDS):
        fault = rng.choice(FAULTS)
        lines = rng.randrange(10, 40)
        folder = tmp_path / f"round-{round_number}"
        built = InputBuilder()
        for i in range(lines):
            built.ok("in.jsonl", f"{round_number}-{i}", chat(f"line {i}"))
        if rng.random() < 0.5:
            built.add("in.jsonl", b"{broken", None, "invalid_json")
        built.write(str(folder / "in"))
        engine_args = {"seconds_per_request": 0.02, "invocations_dir": str(folder / "calls"),
                       "fault_marker": str(folder / "fault-happened")}
        if fault.startswith("engine"):
            engine_args.update(fault=fault.split("-")[1], fault_after=rng.randrange(1, lines // 2))  # reached by either replica
            monkeypatch.delenv("RAYBATCH_FAULT_WRITER_CRASH", raising=False)
        else:
            monkeypatch.setenv("RAYBATCH_FAULT_WRITER_CRASH", f"{rng.randrange(1, 4)}:{folder / 'fault-happened'}")
        config = RunConfig(
            input=str(folder / "in"), output=str(folder / "out"), model="scripted",
            part_max_rows=rng.choice([1, 3, 7]), part_max_seconds=0.5,
            engine={"kind": "scripted", "replicas": rng.choice([1, 2]), "batch_size": 2,
                    "concurrent_batches": 2, "request_timeout_seconds": 3, "engine_args": engine_args},
        )
        context = f"round {round_number} ({fault}, seed {seed})"
        try:
            summary = run_job(config)
        except Exception:
            assert fault == "writer-crash", context  # only a lost writer stops a run
            monkeypatch.delenv("RAYBATCH_FAULT_WRITER_CRASH")
            summary = run_job(config)  # the same command again resumes
        assert summary.state == "completed", context
        check_run(str(folder / "out"), built.expected)
        assert set(invocations(folder / "calls")) == {f"{round_number}-{i}" for i in range(lines)}, context
        print(f"{context}: {lines} lines, fault {'hit' if (folder / 'fault-happened').exists() else 'not reached'}")
