"""Rows per second where per-row overhead dominates: 100k tiny rows.

Two measurements, each printed as a table line:

- **pipeline**: `raybatch run`'s `run_job` over N tiny chat rows with the scripted
  engine (it answers at once), local storage: read → validate → preprocess → engine
  pool → postprocess → write → publish. Ray is started before the clock starts; the
  run's own pool, scan, commits and publish are inside it. Target (issue 11): at least
  20,000 rows/s on the project's 2-core machine.
- **writer**: one `OutputWriter` in this process (no Ray), fed finished rows in appends
  of 1,024 rows as the driver's `WriterFeed` sends them, default part settings (1,000
  rows), on local storage and on S3 (moto's server on loopback): the ceiling of one
  writer, commits and progress included; then the publish, timed apart.
- **stages without Ray**: the pipeline's own stage functions and in-driver executor in
  this process, the scripted engine called directly: the CPU per row that is left
  without any actor call, with the seconds spent in each stage.

    .venv/bin/python benchmarks/tiny_rows.py [--rows 100000] [--profile FILE]
    .venv/bin/python benchmarks/tiny_rows.py --smoke   # small sizes: does it work
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def write_input(path: Path, rows: int) -> Path:
    with open(path, "w") as out:
        for i in range(rows):
            body = {"messages": [{"role": "user", "content": f"hi {i}"}], "max_tokens": 8}
            out.write(json.dumps({"custom_id": f"r{i}", "body": body}) + "\n")
    return path


def pipeline_rows_per_second(work: Path, rows: int, profile: str | None, batch_size: int | None) -> dict:
    from raybatch.config import RunConfig
    from raybatch.runner import ensure_ray, run_job

    write_input(work / "in.jsonl", rows)
    config = RunConfig(
        input=str(work / "in.jsonl"), output=str(work / "out"), model="scripted",
        engine={"kind": "scripted", "replicas": 1, **({"batch_size": batch_size} if batch_size else {})},
    )
    ensure_ray()
    profiler = None
    if profile:
        import cProfile

        profiler = cProfile.Profile()
        profiler.enable()
    started = time.perf_counter()
    summary = run_job(config)
    seconds = time.perf_counter() - started
    if profiler:
        profiler.disable()
        profiler.dump_stats(profile)
    progress = summary.status.progress
    assert summary.state == "completed", summary
    assert progress.total_processed_requests == rows, progress
    with open(work / "out" / "results.jsonl", "rb") as published:
        assert sum(1 for _ in published) == rows
    return {"rows": rows, "seconds": seconds, "rows_per_second": rows / seconds}


def stages_rows_per_second(work: Path, rows: int, batch_size: int | None, profile: str | None) -> dict:
    """The same stage functions and the same in-driver executor as the pipeline, in
    this process and without Ray: the engine is the scripted engine called directly
    (what a replica does with a row, minus the actor call), the writer an OutputWriter
    here. What is left is the pipeline's own CPU per row."""
    import asyncio

    from raybatch.config import RunConfig
    from raybatch.engines.scripted import ScriptedEngine
    from raybatch.output_layout import publish_files
    from raybatch.pipeline.engine import answer_batch
    from raybatch.pipeline.in_driver import stream_in_driver
    from raybatch.pipeline.postprocess import finish_rows
    from raybatch.pipeline.preprocess import prepare_requests
    from raybatch.pipeline.rows import EngineRequest
    from raybatch.pipeline.write import OutputWriter
    from raybatch.runner import _finish_args, _lines_here, _prepare_args, scan_input
    from raybatch.storage import Location, list_shards

    write_input(work / "in.jsonl", rows)
    config = RunConfig(input=str(work / "in.jsonl"), output=str(work / "out"), model="scripted",
                       engine={"kind": "scripted", **({"batch_size": batch_size} if batch_size else {})})
    engine = ScriptedEngine({})

    async def answer(request_json: str):
        request = EngineRequest.model_validate_json(request_json)
        result = await engine.generate(request)
        return request.kind, result.model_dump_json(), None, None

    async def submit(rows_):
        return await asyncio.gather(*(answer(request) for _, _, request in rows_))

    async def stage(batch):
        return await answer_batch(batch, submit)

    profiler = None
    if profile:
        import cProfile

        profiler = cProfile.Profile()
        profiler.enable()
    started, cpu_started = time.perf_counter(), time.process_time()
    shards = list_shards(config.input)
    scan = scan_input(shards, config)
    writer = OutputWriter(config.output, cap_bytes=config.output_cap_bytes, part_max_rows=config.part_max_rows,
                          part_max_bytes=config.part_max_bytes, part_max_seconds=config.part_max_seconds,
                          total_input_requests=scan.lines)
    prepare_args, finish_args = _prepare_args(config, scan), _finish_args(config)
    spent = {"scan": time.perf_counter() - started, "validate+preprocess": 0.0, "postprocess": 0.0,
             "write": 0.0, "publish": 0.0}
    # CPU seconds too: on a loaded machine they say more about the code than wall time.
    cpu = {**dict.fromkeys(spent, 0.0), "scan": time.process_time() - cpu_started}

    def timed(name, function):
        def call(*args):
            began, cpu_began = time.perf_counter(), time.process_time()
            try:
                return function(*args)
            finally:
                spent[name] += time.perf_counter() - began
                cpu[name] += time.process_time() - cpu_began
        return call

    lines = _lines_here(shards, config)
    for table in stream_in_driver(lines, timed("validate+preprocess", lambda t: prepare_requests(t, **prepare_args)),
                                  stage, timed("postprocess", lambda t: finish_rows(t, **finish_args)),
                                  config.engine.batch_size, 8):
        timed("write", writer.append)(table)
    status = timed("write", writer.flush)()
    timed("publish", publish_files)(Location(config.output))
    seconds = time.perf_counter() - started
    spent["the rest: read, engine, executor"] = seconds - sum(spent.values())
    cpu["the rest: read, engine, executor"] = time.process_time() - cpu_started - sum(cpu.values())
    print("stages without Ray, seconds per stage:", ", ".join(f"{k} {v:.2f}" for k, v in spent.items()))
    print("stages without Ray, CPU µs per row:", ", ".join(f"{k} {v / rows * 1e6:.0f}" for k, v in cpu.items()),
          f"(all {(time.process_time() - cpu_started) / rows * 1e6:.0f})")
    if profiler:
        profiler.disable()
        profiler.dump_stats(profile)
    assert status.progress.total_processed_requests == rows, status
    return {"rows": rows, "seconds": seconds, "rows_per_second": rows / seconds}


def _finished_batches(rows: int, batch: int):
    import pyarrow as pa

    for start in range(0, rows, batch):
        lines = list(range(start, min(rows, start + batch)))
        yield pa.table({
            "shard": ["in.jsonl"] * len(lines),
            "line": lines,
            "is_error": [False] * len(lines),
            "output": [json.dumps({"custom_id": f"r{i}", "response": {"body": {"text": "ih"}}}) for i in lines],
            "prompt_tokens": [4] * len(lines),
            "completion_tokens": [2] * len(lines),
            "cached_tokens": [0] * len(lines),
        })


def writer_rows_per_second(output_url: str, rows: int, part_rows: int = 1000) -> dict:
    from raybatch.output_layout import publish_files
    from raybatch.pipeline.write import OutputWriter

    # Appends of 1,024 rows, as the driver's WriterFeed sends them; made before the clock starts.
    batches = list(_finished_batches(rows, 1024))
    started = time.perf_counter()
    writer = OutputWriter(output_url, cap_bytes=1 << 40, part_max_rows=part_rows,
                          part_max_bytes=16 << 20, part_max_seconds=5.0, total_input_requests=rows)
    for table in batches:
        writer.append(table)
    status = writer.flush()
    appended = time.perf_counter() - started
    publish_files(_location(output_url))
    seconds = time.perf_counter() - started
    assert status.progress.total_processed_requests == rows
    return {"rows": rows, "seconds": appended, "publish_seconds": seconds - appended, "rows_per_second": rows / appended}


def _location(url: str):
    from raybatch.storage import Location

    return Location(url)


def _moto() -> tuple[object, str]:
    from moto.server import ThreadedMotoServer

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    import logging

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # a line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    os.environ.update(AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID="testing",
                      AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1")
    import boto3

    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="bench")
    return server, "s3://bench"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="small sizes (2,000 rows): checks that it works")
    parser.add_argument("--rows", type=int, help="rows through the pipeline (default 100,000)")
    parser.add_argument("--profile", help="write a cProfile of the pipeline run (the driver) here")
    parser.add_argument("--part-rows", type=int, default=1000, help="the writer's part_max_rows (default 1,000)")
    parser.add_argument("--batch-size", type=int, help="engine.batch_size (default: the engine's default)")
    parser.add_argument("--skip", choices=["pipeline", "writer", "stages"], action="append", default=[])
    parser.add_argument("--profile-stages", help="write a cProfile of the stages without Ray here")
    args = parser.parse_args()
    rows = args.rows or (2_000 if args.smoke else 100_000)
    results = {}
    with tempfile.TemporaryDirectory(prefix="raybatch-tiny-rows-") as work:
        work = Path(work)
        if "writer" not in args.skip:
            results["writer, local"] = writer_rows_per_second(str(work / "writer-out"), rows, args.part_rows)
            server, bucket = _moto()
            try:
                results["writer, S3 (moto)"] = writer_rows_per_second(f"{bucket}/writer-out", rows, args.part_rows)
            finally:
                server.stop()
        if "stages" not in args.skip:
            (work / "stages").mkdir()
            results["stages without Ray, local"] = stages_rows_per_second(
                work / "stages", rows, args.batch_size, args.profile_stages)
        if "pipeline" not in args.skip:
            (work / "pipe").mkdir()
            results["pipeline, scripted engine, local"] = pipeline_rows_per_second(work / "pipe", rows, args.profile, args.batch_size)
    print(f"\n{'measured':<36} {'rows':>9} {'seconds':>8} {'rows/s':>9}  publish")
    for name, result in results.items():
        publish = f"{result['publish_seconds']:.2f} s" if "publish_seconds" in result else "(in seconds)"
        print(f"{name:<36} {result['rows']:>9,} {result['seconds']:>8.2f} {result['rows_per_second']:>9,.0f}  {publish}")
    pipeline = results.get("pipeline, scripted engine, local")
    if pipeline and not args.smoke and pipeline["rows_per_second"] < 20_000:
        print("target missed: the pipeline is under 20,000 rows/s")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
