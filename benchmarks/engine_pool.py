"""The engine pool's benchmarks, through a running service, beside one `LLM.chat` call
over the same prompts with the same engine arguments, all in one run:

  1. two identical jobs one after the other: the second's first visible row after
     create, and its total time against the first's (target: <= 5 s and <= 0.4x);
  2. two accounts create same-size jobs at the same moment: how far the other job is
     when the first completes (target: >= 60 %), and when the other completes;
  3. steady state (target: >= 0.95x): on the warm replica, a job over the same rows as
     one `LLM.chat` call and a job over `--steady-factor` times as many; the steady
     rate is the difference of their output tokens over the difference of their
     create-to-completed times (the fixed costs of a job, its start, lead batch and
     end, cancel out), against the same difference of two `LLM.chat` calls over the
     same rows on one engine. The short job's own rate against the call's is printed
     too (no target);
  4. (`--parts affinity`, not in the default run) prefix affinity: one job whose rows
     share a few long few-shot prefixes, on two replicas, with `prefix_affinity` off and
     on (a service each): cached input tokens and wall time.

    .venv/bin/python benchmarks/engine_pool.py            # ~13M-parameter model, 400 rows
    .venv/bin/python benchmarks/engine_pool.py --smoke    # tiny model, a few rows: does it work
    .venv/bin/python benchmarks/engine_pool.py --parts fair --service '{"spare_drivers": 1}'
    .venv/bin/python benchmarks/engine_pool.py --parts affinity
    # the issue's own setting: the ~110M model, vLLM's defaults (torch.compile), bf16
    .venv/bin/python benchmarks/engine_pool.py --parts warm --shape bench --engine-args '{}'

Prints a table and writes the figures as JSON (--out). It starts its own service
(`raybatch up`): no other Ray may run on the machine. Figures go in docs/performance.md.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import (  # noqa: E402
    build_model,
    engine_args,
    engine_extra,
    llm_chat_baseline,
    service,
    write_requests,
)


def _wait(client, job_id: str, on_poll=None, poll: float = 0.25) -> dict:
    while True:
        job = client.get_job(job_id)
        if on_poll:
            on_poll(job)
        if job["state"] in ("JOB_STATE_COMPLETED", "JOB_STATE_FAILED", "JOB_STATE_CANCELLED", "JOB_STATE_EXPIRED"):
            assert job["state"] == "JOB_STATE_COMPLETED", job
            return job
        time.sleep(poll)


def _progress(job: dict) -> dict:
    return job.get("jobProgress") or {}


def timed_job(client, dataset: str, job_id: str, max_tokens: int, poll: float = 0.25) -> dict:
    """Create a job and time it: first visible row (jobProgress > 0) and completion, by
    this client's clock, polling every `poll` seconds; and by the service's, from the
    job's createTime to its updateTime once COMPLETED (`service_s`, exact at any poll)."""
    created = time.monotonic()
    client.create_job(model="bench", input_dataset_id=dataset, job_id=job_id,
                      inference_parameters={"max_tokens": max_tokens})
    first: dict = {}

    def watch(job):
        if "at" not in first and int(_progress(job).get("totalProcessedRequests") or 0) > 0:
            first["at"] = time.monotonic() - created

    job = _wait(client, job_id, watch, poll)
    progress = _progress(job)
    stamps = [datetime.fromisoformat(job[field]) for field in ("createTime", "updateTime")]
    return {"first_row_s": first.get("at"), "total_s": time.monotonic() - created,
            "service_s": (stamps[1] - stamps[0]).total_seconds(),
            "input_tokens": int(progress.get("inputTokens") or 0),
            "cached_input_tokens": int(progress.get("cachedInputTokenCount") or 0),
            "output_tokens": int(progress.get("outputTokens") or 0)}


def two_accounts(clients, dataset: str, max_tokens: int) -> dict:
    """Both accounts create a job at once; when the first completes, how far is the other
    (its jobProgress: committed rows), and when does it complete?"""
    start = threading.Barrier(len(clients))
    done: dict = {}
    lock = threading.Lock()

    def run(account, client):
        start.wait()
        created = time.monotonic()
        client.create_job(model="bench", input_dataset_id=dataset, job_id="fair", inference_parameters={"max_tokens": max_tokens})
        _wait(client, "fair")
        with lock:
            done.setdefault("seconds", []).append(time.monotonic() - created)
            first = done.setdefault("first", account) == account
        if first:  # the other job's progress at this moment
            other = next(c for a, c in clients.items() if a != account)
            done["other_percent"] = int(_progress(other.get_job("fair")).get("percent") or 0)

    threads = [threading.Thread(target=run, args=item) for item in clients.items()]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    first_s, other_s = done["seconds"]
    return {"first_done": done["first"], "other_percent_then": done["other_percent"],
            "first_s": first_s, "other_s": other_s}


def steady_tokens_per_second(client, dataset: str, long_dataset: str, max_tokens: int) -> dict:
    """Two jobs on the warm replica, over the baseline's rows and over its longer rows,
    each from create to COMPLETED by the service's timestamps: the short one's output
    tokens/s (its scheduling, lead batch, commits and last progress copy count against
    it), and the steady rate, the long one's extra tokens over its extra seconds. Polled
    every 2 s: this client's GETs every 0.25 s cost the Serve proxy and the API replica
    about 0.1 of the two cores the engine needs. (A window between 20 % and 80 % of one
    job's rows, measured before, reads progress that moves only at commits, in bursts
    of whole waves, and so measured the commits' timing more than the pace.)"""
    short = timed_job(client, dataset, "steady", max_tokens, poll=2.0)
    long = timed_job(client, long_dataset, "steady-long", max_tokens, poll=2.0)
    return {**short, "output_tokens_per_s": short["output_tokens"] / short["service_s"], "long": long,
            "steady_tokens_per_s": _rate(long["output_tokens"] - short["output_tokens"], long["service_s"] - short["service_s"])}


def _rate(tokens: float, seconds: float) -> float:
    """Tokens per second; NaN when the longer run was not longer (a smoke run's noise)."""
    return tokens / seconds if seconds > 0 else float("nan")


def write_prefixed(path: Path, rows: int, prefixes: int, max_tokens: int) -> Path:
    """Rows behind `prefixes` different few-shot system prompts (about 800 tokens each),
    each row's drawn at random (seeded): spread evenly over two replicas, every prefix
    lands on both. (Taken in turn instead, row i's prefix i mod 8 would follow the even
    spread's own alternation, and each replica would see only half the prefixes anyway.)"""
    draw = random.Random(0)
    shots = ["".join(f"Example {p}.{i}: what is {i} times {p + 2}? It is {i * (p + 2)}.\n" for i in range(24))
             for p in range(prefixes)]
    with open(path, "w") as out:
        for i in range(rows):
            shot = draw.randrange(prefixes)
            body = {"messages": [{"role": "system", "content": shots[shot]},
                                 {"role": "user", "content": f"What is {i} times {shot + 2}?"}],
                    "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
            out.write(json.dumps({"custom_id": f"row-{i}", "body": body}) + "\n")
    return path


def prefix_affinity(work: Path, model: str, extra: dict, rows: int, max_tokens: int) -> dict:
    """The same job on two warm replicas, `prefix_affinity` off then on (a service each)."""
    requests = write_prefixed(work / "prefixed.jsonl", rows, prefixes=8, max_tokens=max_tokens)
    figures = {}
    for affinity in (False, True):
        engine = {"max_model_len": 1024, "replicas": 2, "prefix_affinity": affinity, "engine_args": extra}
        with service(work / f"affinity-{affinity}", {"bench": {"source": model, "engine": engine}},
                     accounts=("bench-a",), settings={"admin_accounts": ["bench-a"]}) as clients:
            client = clients["bench-a"]
            client.create_dataset("prefixed")
            client.upload_dataset("prefixed", requests)
            deadline = time.monotonic() + 900
            while sum(r["state"] == "ready" for r in client.list_engines()["replicas"]) < 2:
                assert time.monotonic() < deadline, "two replicas never became ready"
                time.sleep(2)
            setting = "on" if affinity else "off"
            figures[setting] = timed_job(client, "prefixed", "prefixed", max_tokens)
        print(f"prefix affinity {setting}: {figures[setting]}", flush=True)
    return figures


def pool_parts(parts: set[str], figures: dict, work: Path, catalog: dict, settings: dict,
               requests: Path, long_requests: Path, max_tokens: int) -> None:
    """Parts 1 to 3, through one service, into `figures`."""
    with service(work, catalog, accounts=("bench-a", "bench-b"), settings=settings) as clients:
        a = clients["bench-a"]
        for client in clients.values():
            client.create_dataset("requests")
            client.upload_dataset("requests", requests)
        if "steady" in parts:
            a.create_dataset("long")
            a.upload_dataset("long", long_requests)
        if "warm" in parts:
            figures["job_1"] = timed_job(a, "requests", "first", max_tokens)
            print(f"job 1 (cold engine): {figures['job_1']}", flush=True)
            figures["job_2"] = timed_job(a, "requests", "second", max_tokens)
            print(f"job 2 (warm engine): {figures['job_2']}", flush=True)
        else:  # the other parts measure a warm engine
            a.create_dataset("one")
            a.upload_dataset("one", write_requests(work / "one.jsonl", 1, max_tokens))
            print(f"warm-up job: {timed_job(a, 'one', 'warm-up', max_tokens)}", flush=True)
        if "fair" in parts:
            figures["two_accounts"] = two_accounts(clients, "requests", max_tokens)
            print(f"two accounts at once: {figures['two_accounts']}", flush=True)
        if "steady" in parts:
            figures["steady"] = steady_tokens_per_second(a, "requests", "long", max_tokens)
            print(f"steady (the baseline's rows and its longer rows, warm): {figures['steady']}", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny model, few rows: checks that it works")
    parser.add_argument("--rows", type=int, help="rows per job (default 400; smoke 12)")
    parser.add_argument("--max-tokens", type=int, help="output tokens per row (default 64; smoke 8)")
    parser.add_argument("--out", default=str(ROOT / "out" / "bench-engine-pool.json"))
    parser.add_argument("--parts", default="warm,fair,steady",
                        help="which to run, of warm (jobs 1 and 2), fair (two accounts), steady (a warm job "
                             "over the baseline's rows), affinity (two more services: prefix affinity off and on)")
    parser.add_argument("--service", default="{}", help="service settings (JSON) over the benchmark's")
    parser.add_argument("--shape", choices=("tiny", "small", "bench"),
                        help="the random model's shape (default small, ~13M parameters; smoke tiny; bench ~110M)")
    parser.add_argument("--engine-args", help="vLLM arguments (JSON) instead of the benchmark's "
                        "(eager, float32 on CPU), for the service and the baseline alike")
    parser.add_argument("--steady-factor", type=int, default=4,
                        help="the steady part's long job has this many times the rows (default 4)")
    args = parser.parse_args()
    parts = set(args.parts.split(","))
    rows = args.rows or (12 if args.smoke else 400)
    max_tokens = args.max_tokens or (8 if args.smoke else 64)
    shape = args.shape or ("tiny" if args.smoke else "small")
    model = build_model(shape)
    extra = engine_extra(shape) if args.engine_args is None else json.loads(args.engine_args)
    work = Path(tempfile.mkdtemp(prefix="raybatch-bench-"))
    requests = write_requests(work / "requests.jsonl", rows, max_tokens)
    long_requests = write_requests(work / "long.jsonl", rows * args.steady_factor, max_tokens)
    arguments = engine_args(shape, extra)

    settings = json.loads(args.service)
    print(f"model: {shape} ({model}); {rows} rows x {max_tokens} output tokens; engine {arguments}; "
          f"service settings {settings or 'default'}", flush=True)
    figures: dict = {"machine": f"{os.cpu_count()} cores", "model": shape, "rows": rows, "max_tokens": max_tokens,
                     "engine_args": arguments, "service": settings}
    if "steady" in parts:
        figures["llm_chat"] = llm_chat_baseline(model, requests, arguments, then=long_requests)
        print(f"one LLM.chat call: {figures['llm_chat']}", flush=True)

    catalog = {"bench": {"source": model, "engine": {"max_model_len": 1024, "engine_args": extra}}}
    if parts & {"warm", "fair", "steady"}:
        pool_parts(parts, figures, work, catalog, settings, requests, long_requests, max_tokens)
    if "affinity" in parts:
        figures["affinity"] = prefix_affinity(work, model, extra, rows, max_tokens)

    lines = []
    if "warm" in parts:
        job_1, job_2 = figures["job_1"], figures["job_2"]
        lines += [("job 2 first visible row after create (s)", f"{job_2['first_row_s'] or float('nan'):.1f}", "<= 5"),
                  ("job 2 total / job 1 total", f"{job_2['total_s'] / job_1['total_s']:.2f}", "<= 0.40")]
    if "fair" in parts:
        fair = figures["two_accounts"]
        lines += [("other account done when the first completes (%)", str(fair["other_percent_then"]), ">= 60"),
                  ("other account's job time / the first's", f"{fair['other_s'] / fair['first_s']:.2f}", "-")]
    if "steady" in parts:
        chat, steady = figures["llm_chat"], figures["steady"]
        chat_steady = _rate(chat["then"]["output_tokens"] - chat["output_tokens"],
                            chat["then"]["generate_s"] - chat["generate_s"])
        figures["llm_chat"]["steady_tokens_per_s"] = chat_steady
        lines += [("steady tok/s (long job - short) / LLM.chat's", f"{steady['steady_tokens_per_s'] / chat_steady:.2f}", ">= 0.95"),
                  ("short job's tok/s (create to done) / LLM.chat", f"{steady['output_tokens_per_s'] / chat['output_tokens_per_s']:.2f}", "-")]
    if "affinity" in parts:
        off, on = figures["affinity"]["off"], figures["affinity"]["on"]
        lines += [("prefix affinity: cached input tokens off / on", f"{off['cached_input_tokens']}/{on['cached_input_tokens']}", "on more"),
                  ("prefix affinity: wall time off / on", f"{off['total_s'] / on['total_s']:.2f}", "> 1")]
    figures["ratios"] = {name: figure for name, figure, _ in lines}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(figures, indent=2))
    print()
    print(f"{'benchmark':<48}{'figure':>12}{'target':>10}")
    for name, figure, target in lines:
        print(f"{name:<48}{figure:>12}{target:>10}")
    print(f"figures: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
