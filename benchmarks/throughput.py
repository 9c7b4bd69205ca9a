"""Throughput, side by side in one run, on the same prompts and engine arguments:

  - one `LLM.chat` call (the engine alone: the ceiling),
  - `python -m vllm.entrypoints.openai.run_batch` (vLLM's own batch runner),
  - `raybatch run`, cold (Ray start, input scan, engine start: all of it),
  - a job through a running service whose replica is warm;
  - (`--runners ...,service_text`) the same with the replica rendering the prompts, not
    the pipeline (`tokenize_in_pipeline` off), on the same warm replica, run first;

over four workloads:

  uniform   every row the same length (`ignore_eos`, fixed max_tokens);
  mixed     max_tokens drawn from 8 to 512: a runner that waits for a batch's slowest
            row leaves the engine idle;
  fewshot   one long few-shot prefix shared by every row, short answers: prefix caching
            and the order rows reach the engine decide;
  tiny      many one-token rows on the tiny model: per-row overhead is all there is.

    .venv/bin/python benchmarks/throughput.py            # ~110M-parameter model; tiny rows: 100k
    .venv/bin/python benchmarks/throughput.py --smoke    # tiny model, a few rows: does it work (minutes)
    .venv/bin/python benchmarks/throughput.py --workloads uniform,tiny --tiny-rows 20000
    .venv/bin/python benchmarks/throughput.py --shape small --workloads uniform,fewshot

Prints a table (wall seconds, output tokens/s, ratios against run-batch and the
`LLM.chat` call) and writes the figures as JSON (--out). It starts its own Ray and
service: no other Ray may run on the machine. Figures go in docs/performance.md.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import (  # noqa: E402
    PYTHON,
    SYSTEM_PROMPT,
    build_model,
    engine_args,
    engine_extra,
    llm_chat_baseline,
    service,
)

RUNNERS = ("llm_chat", "run_batch", "raybatch_run", "service_warm")
EXTRA_RUNNERS = ("service_text",)
WORKLOADS = ("uniform", "mixed", "fewshot", "tiny")
FEW_SHOT = "".join(f"Question: what is {i} plus {i}? Answer: {2 * i}.\n" for i in range(20))  # ~540 tokens


def _line(i: int, messages: list[dict], max_tokens: int) -> str:
    body = {"messages": messages, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
    return json.dumps({"custom_id": f"row-{i}", "method": "POST", "url": "/v1/chat/completions", "body": body})


def write_workload(name: str, path: Path, rows: int, max_tokens: int) -> Path:
    """The workload's requests file. Every row has `ignore_eos`, so each yields exactly
    its max_tokens (a random model would otherwise stop anywhere)."""
    draw = random.Random(0)
    with open(path, "w") as out:
        for i in range(rows):
            if name == "uniform":
                messages = [{"role": "system", "content": SYSTEM_PROMPT},
                            {"role": "user", "content": f"Tell me about item number {i}."}]
                tokens = max_tokens
            elif name == "mixed":
                messages = [{"role": "user", "content": f"Write about topic {i}."}]
                tokens = draw.randint(8, max_tokens)
            elif name == "fewshot":
                messages = [{"role": "system", "content": FEW_SHOT},
                            {"role": "user", "content": f"Question: what is {i} plus {i}?"}]
                tokens = max_tokens
            else:  # tiny
                messages = [{"role": "user", "content": str(i)}]
                tokens = 1
            out.write(_line(i, messages, tokens) + "\n")
    return path


def _output_tokens(results: Path) -> tuple[int, int]:
    """(answered rows, output tokens) of an OpenAI-format batch output file."""
    rows = tokens = 0
    with open(results) as lines:
        for line in lines:
            record = json.loads(line)
            body = (record.get("response") or {}).get("body") or {}
            if body.get("usage"):
                rows += 1
                tokens += body["usage"]["completion_tokens"]
    return rows, tokens


def _flags(arguments: dict) -> list[str]:
    """Engine arguments as vLLM's command-line flags."""
    flags = []
    for key, value in arguments.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            flags.append(flag)
        elif value is False:
            flags.append("--no-" + key.replace("_", "-"))
        else:
            flags += [flag, str(value)]
    return flags


def _timed(command: list[str], env: dict) -> float:
    started = time.monotonic()
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=7200)
    if done.returncode != 0:
        raise RuntimeError(f"{command[:4]} failed:\n{done.stderr[-3000:]}")
    return time.monotonic() - started


def run_batch(model: str, requests: Path, arguments: dict, work: Path) -> dict:
    out = work / f"run-batch-{requests.stem}.jsonl"
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
    wall = _timed([PYTHON, "-m", "vllm.entrypoints.openai.run_batch", "-i", str(requests), "-o", str(out),
                   "--model", model, *_flags(arguments)], env)
    rows, tokens = _output_tokens(out)
    return {"wall_s": wall, "rows": rows, "output_tokens": tokens}


def raybatch_run(model: str, requests: Path, extra: dict, work: Path) -> dict:
    out = work / f"raybatch-run-{requests.stem}"
    config = work / "run-config.json"
    config.write_text(json.dumps({"engine": {"max_model_len": 1024, "engine_args": extra}}))
    env = {**os.environ}
    env.pop("RAY_ADDRESS", None)
    wall = _timed([PYTHON, "-m", "raybatch.cli", "run", "--input", str(requests), "--output", str(out),
                   "--model", model, "--config", str(config)], env)
    rows, tokens = _output_tokens(out / "results.jsonl")
    return {"wall_s": wall, "rows": rows, "output_tokens": tokens}


def service_job(client, model_name: str, dataset: str, job_id: str) -> dict:
    created = time.monotonic()
    client.create_job(model=model_name, input_dataset_id=dataset, job_id=job_id)
    while True:
        job = client.get_job(job_id)
        if job["state"] in ("JOB_STATE_COMPLETED", "JOB_STATE_FAILED", "JOB_STATE_CANCELLED", "JOB_STATE_EXPIRED"):
            break
        time.sleep(0.25)
    assert job["state"] == "JOB_STATE_COMPLETED", job
    progress = job.get("jobProgress") or {}
    return {"wall_s": time.monotonic() - created, "rows": int(progress.get("successfullyProcessedRequests") or 0),
            "output_tokens": int(progress.get("outputTokens") or 0),
            "cached_input_tokens": int(progress.get("cachedInputTokenCount") or 0)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny model, a few rows: checks that it works")
    parser.add_argument("--workloads", default=",".join(WORKLOADS))
    parser.add_argument("--runners", default=",".join(RUNNERS))
    parser.add_argument("--rows", type=int, help="rows of uniform and fewshot (default 400; smoke 12)")
    parser.add_argument("--mixed-rows", type=int, help="rows of mixed (default 100; smoke 8)")
    parser.add_argument("--tiny-rows", type=int, help="rows of tiny (default 100000; smoke 300)")
    parser.add_argument("--shape", choices=("bench", "small"), default="bench",
                        help="model of uniform, mixed and fewshot: bench (~110M, the issue's) or small "
                             "(~13M, several times faster on a CPU: the 400-row runs fit in minutes)")
    parser.add_argument("--out", default=str(ROOT / "out" / "bench-throughput.json"))
    args = parser.parse_args()
    smoke = args.smoke
    workloads = [w for w in args.workloads.split(",") if w]
    runners = [r for r in args.runners.split(",") if r]
    assert set(workloads) <= set(WORKLOADS) and set(runners) <= set(RUNNERS + EXTRA_RUNNERS), (workloads, runners)
    shape = "tiny" if smoke else args.shape
    sizes = {  # (rows, max_tokens)
        "uniform": (args.rows or (12 if smoke else 400), 8 if smoke else 64),
        "mixed": (args.mixed_rows or (8 if smoke else 100), 32 if smoke else 512),
        "fewshot": (args.rows or (12 if smoke else 400), 4 if smoke else 16),
        "tiny": (args.tiny_rows or (300 if smoke else 100_000), 1),
    }
    models = {"bench": build_model(shape), "bench-tiny": build_model("tiny")}
    work = Path(tempfile.mkdtemp(prefix="raybatch-throughput-"))
    files = {w: write_workload(w, work / f"{w}.jsonl", *sizes[w]) for w in workloads}
    # The smoke's model is the tiny one already: one replica in the service, not two.
    model_of = {w: "bench-tiny" if w == "tiny" and not smoke else "bench" for w in workloads}
    arguments = engine_args(shape)  # the same for both shapes
    extra = engine_extra(shape)
    print(f"{os.cpu_count()} cores; model {shape} (tiny rows: tiny); engine {arguments}; sizes {sizes}", flush=True)

    figures: dict[str, dict[str, dict]] = {w: {} for w in workloads}
    # Each cold runner starts an engine per workload; the smoke starts them for one
    # workload only (the warm service still answers all four).
    cold = [w for w in workloads if not smoke or w == "uniform"]
    for w in cold:
        model = models[model_of[w]]
        if "llm_chat" in runners:
            figures[w]["llm_chat"] = llm_chat_baseline(model, files[w], arguments)
            print(f"{w} / LLM.chat: {figures[w]['llm_chat']}", flush=True)
        if "run_batch" in runners:
            figures[w]["run_batch"] = run_batch(model, files[w], arguments, work)
            print(f"{w} / run_batch: {figures[w]['run_batch']}", flush=True)
        if "raybatch_run" in runners:
            figures[w]["raybatch_run"] = raybatch_run(model, files[w], extra, work)
            print(f"{w} / raybatch run (cold): {figures[w]['raybatch_run']}", flush=True)

    three_jobs = None
    if {"service_warm", "service_text"} & set(runners):
        catalog = {name: {"source": path, "engine": {"max_model_len": 1024, "min_replicas": 1, "engine_args": extra}}
                   for name, path in models.items() if name in set(model_of.values())}
        # The same replicas (the same engine arguments), the replica rendering the prompts.
        catalog.update({f"{name}-text": {**entry, "engine": {**entry["engine"], "tokenize_in_pipeline": False}}
                        for name, entry in catalog.items()})
        with service(work / "service", catalog=catalog, accounts=("bench",)) as clients:
            client = clients["bench"]
            for w in workloads:
                client.create_dataset(w)
                client.upload_dataset(w, files[w])
            for name in set(model_of.values()):  # warm each replica with one job first
                warm = next(w for w in workloads if model_of[w] == name)
                service_job(client, name, warm, f"warm-{name}")
            for w in workloads:
                if "service_text" in runners:
                    figures[w]["service_text"] = service_job(client, f"{model_of[w]}-text", w, f"text-{w}")
                    print(f"{w} / service, warm, the replica renders: {figures[w]['service_text']}", flush=True)
                if "service_warm" in runners:
                    figures[w]["service_warm"] = service_job(client, model_of[w], w, f"job-{w}")
                    print(f"{w} / service, warm: {figures[w]['service_warm']}", flush=True)
            if "uniform" in workloads and "service_warm" in runners:  # three jobs in a row through the running service
                three = [figures["uniform"]["service_warm"]] + [
                    service_job(client, "bench", "uniform", f"again-{i}") for i in range(2)]
                three_jobs = sum(j["wall_s"] for j in three)

    _print_table(figures, three_jobs)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"machine": f"{os.cpu_count()} cores", "model": shape, "sizes": sizes,
                                          "engine_args": arguments, "figures": figures,
                                          "three_service_jobs_s": three_jobs}, indent=2))
    print(f"figures: {args.out}")
    return 0


def _print_table(figures: dict, three_jobs) -> None:
    print()
    print(f"{'workload':<10}{'runner':<22}{'wall s':>9}{'out tok/s':>11}{'÷ run-batch':>13}{'÷ LLM.chat':>12}")
    for w, by_runner in figures.items():
        batch = by_runner.get("run_batch", {}).get("wall_s")
        llm = by_runner.get("llm_chat", {}).get("wall_s")
        for runner, f in by_runner.items():
            speed = f["output_tokens"] / f["wall_s"]
            # A ratio > 1 is faster than the baseline: its wall time over this runner's.
            vs_batch = f"{batch / f['wall_s']:.2f}x" if batch else "-"
            vs_llm = f"{llm / f['wall_s']:.2f}x" if llm else "-"
            print(f"{w:<10}{runner:<22}{f['wall_s']:>9.1f}{speed:>11.0f}{vs_batch:>13}{vs_llm:>12}")
    batch = figures.get("uniform", {}).get("run_batch", {}).get("wall_s")
    if three_jobs and batch:
        print(f"three uniform jobs through the running service: {three_jobs:.1f} s; three run-batch "
              f"invocations: {3 * batch:.1f} s: {3 * batch / three_jobs:.2f}x (target >= 2x)")
    print("LLM.chat's generation alone (no start-up), output tokens/s:",
          {w: round(f["llm_chat"]["output_tokens_per_s"]) for w, f in figures.items() if "llm_chat" in f})


if __name__ == "__main__":
    sys.exit(main())
