"""One batch job, start to end: plan engines, scan the input, stream it through the
pipeline, commit parts, publish the result files and report.

    read → validate → preprocess → engine → postprocess → write
    (pipeline/read.py … pipeline/write.py, in that order)

A run resumes where an earlier run with the same output location stopped: committed
lines are skipped, so running the same command again after a crash or a cap finishes the
job without repeating work.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
import uuid
import warnings
from typing import Callable, Iterator, Optional

import pyarrow as pa
import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
from pydantic import BaseModel

from raybatch import metrics
from raybatch.adapters import lora_engine_args
from raybatch.config import RunConfig
from raybatch.exceptions import InputTooLarge
from raybatch.engines.pool_handle import NAMESPACE, pool_handle
from raybatch.engines.pool_state import JobTicket, PoolModel, pool_model_for
from raybatch.exceptions import ConfigError, EngineStartError, IncompleteRunError, OutputConflictError, RowError
from raybatch.output_layout import (
    RUN_FILE,
    OutputStatus,
    committed_lines,
    load_commits,
    progress_of,
    publish_files,
    succeeded_lines,
)
from raybatch.pipeline.engine import EngineStage, PoolAccess
from raybatch.pipeline.images import ImageLimits
from raybatch.pipeline.in_driver import stream_in_driver
from raybatch.pipeline.postprocess import finish_rows
from raybatch.pipeline.preprocess import prepare_requests
from raybatch.pipeline.prompts import prompt_rendering
from raybatch.pipeline.read import read_shards
from raybatch.pipeline.validate import DuplicateScan, claims_among, scan_custom_ids, validate_body
from raybatch.pipeline.write import OutputWriter, WriterFeed
from raybatch.precision import EnginePlan, cluster_nodes, plan_engines
from raybatch.protocol import CHAT_URL, COMPLETIONS_URL
from raybatch.storage import Location, Shard, list_shards

logger = logging.getLogger(__name__)

class InputScan(BaseModel):
    lines: int = 0  # non-blank lines: the job's totalInputRequests
    blank_lines: int = 0
    duplicates: set[tuple[str, int]] = set()


class RunSummary(BaseModel):
    state: str  # "completed" | "output_cap_reached"
    status: OutputStatus
    blank_lines: int
    wall_seconds: float

    # Apart: a sum of input and output tokens per second compares with no engine's figure.
    @property
    def output_tokens_per_second(self) -> float:
        return self.status.progress.output_tokens / max(self.wall_seconds, 1e-9)

    @property
    def input_tokens_per_second(self) -> float:
        return self.status.progress.input_tokens / max(self.wall_seconds, 1e-9)


def ensure_ray(num_cpus: Optional[int] = None) -> None:
    """Join the cluster in RAY_ADDRESS, or start a local one."""
    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=False)
    else:
        # Logical CPUs above the physical count: the engine actor holds one while its
        # own threads use every core, and the light read/write stages need room beside it.
        # No dashboard: a run's own Ray needs none, and it would cost ~1.5 s of CPU at
        # start and ~2 % of a core while the engine runs (measured on 2 cores).
        ray.init(num_cpus=num_cpus or max(4, os.cpu_count() or 1), include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False


def cluster_plan(config: RunConfig) -> EnginePlan:
    return plan_engines(config.engine, config.precision, cluster_nodes(ray.nodes()))


def job_pool_model(config: RunConfig, plan: EnginePlan, fixed: bool) -> PoolModel:
    """What the job asks the engine pool for (`fixed`: a run's own pool)."""
    if config.lora is not None:  # the base model's replicas serve its adapters' rows too
        plan = plan.model_copy(update={"engine_args": lora_engine_args(config.lora, plan.engine_args, plan.device)})
    return pool_model_for(
        config.engine, plan, config.model, config.served_model_name or config.model, fixed=fixed
    )


def row_bounds(config: RunConfig) -> dict[str, int]:
    """The job's bounds on expensive rows other than max_n, as `validate_body` takes them."""
    return {
        "max_output_tokens": config.max_output_tokens,
        "max_top_logprobs": config.max_top_logprobs,
        "max_json_schema_bytes": config.max_json_schema_bytes,
    }


def _check_job_defaults(config: RunConfig) -> dict:
    """The job's parameters must be valid on their own, or every row would fail."""
    defaults = config.inference_parameters.row_defaults()
    probes = ((CHAT_URL, {"messages": [{"role": "user", "content": "x"}]}), (COMPLETIONS_URL, {"prompt": "x"}))
    for url, probe in probes:
        try:
            validate_body(url, {**defaults, **probe}, max_n=config.max_n, **row_bounds(config))
        except RowError as error:
            raise ConfigError(f"invalid inference parameters: {error.message}") from None
    return defaults


def _claim_output(output: Location, config: RunConfig) -> None:
    """Record what this output belongs to; refuse to mix two different jobs' parts."""
    identity = config.model_dump(
        mode="json", include={
            "input", "model", "inference_parameters", "precision", "max_line_bytes", "max_n", "skip_succeeded_in"
        }
    )
    if config.lora is not None:  # which adapter a row gets is part of what answered it
        identity["lora"] = config.lora.model_dump(mode="json")
    if output.exists(RUN_FILE):
        earlier = json.loads(output.read_bytes(RUN_FILE))
        if earlier != identity:
            changed = sorted(k for k in identity if identity[k] != earlier.get(k))
            raise OutputConflictError(
                f"{config.output} holds output of a run with different {', '.join(changed)}; "
                "use another output location or delete this one"
            )
        return
    output.write_atomic(RUN_FILE, json.dumps(identity, indent=2).encode())


def _lines(shards: list[Shard], config: RunConfig, skip=None) -> ray.data.Dataset:
    # A stage's own exception (EngineStartError, InputTooLarge), not Ray Data's
    # UserCodeException around it: the wrapper's cause does not survive the trip back
    # from a worker, and the run must say what went wrong.
    ray.data.DataContext.get_current().raise_original_map_exception = True
    items = [{"url": s.url, "name": s.name, "size": s.size} for s in shards]
    return ray.data.from_items(items, override_num_blocks=min(len(items), 64)).map_batches(
        read_shards,
        batch_size=1,
        batch_format="pyarrow",
        fn_kwargs={"max_line_bytes": config.max_line_bytes, "skip": skip, "max_shard_bytes": config.max_shard_bytes},
    )


def _lines_here(shards: list[Shard], config: RunConfig, skip=None) -> Iterator[pa.Table]:
    """The read stage in this process: what `_lines` yields through Ray Data."""
    read_args = {"max_line_bytes": config.max_line_bytes, "max_shard_bytes": config.max_shard_bytes, "skip": skip}
    for shard in shards:
        yield from read_shards(pa.table({"url": [shard.url], "name": [shard.name], "size": [shard.size]}), **read_args)


def scan_input(shards: list[Shard], config: RunConfig) -> InputScan:
    """Count the lines and find every custom_id that an earlier line already claimed.
    The workers send a 16-byte digest per line, never the id itself, so the driver's
    memory does not grow with the ids' length. Raises InputTooLarge for a shard that
    expands past `max_shard_bytes`, before any engine starts."""
    found = DuplicateScan([s.name for s in shards])
    scan_args = {"max_line_bytes": config.max_line_bytes, "max_custom_id_bytes": config.max_custom_id_bytes}
    if _in_driver(shards, config):
        # A small input is scanned right here: Ray Data's start-up (seconds) would
        # otherwise stand between a job and its first rows.
        batches = (scan_custom_ids(lines, **scan_args) for lines in _lines_here(shards, config))
    else:
        dataset = _lines(shards, config).map_batches(scan_custom_ids, batch_format="pyarrow", fn_kwargs=scan_args)
        batches = dataset.iter_batches(batch_format="pyarrow", batch_size=None)
    try:
        for batch in batches:
            found.add(batch)
        return InputScan(
            lines=found.lines, blank_lines=found.blank_lines, duplicates=found.duplicates(_confirm(shards, config))
        )
    except Exception as error:
        too_large = _cause_of_type(error, InputTooLarge)
        if too_large is None:
            raise
        # Ray Data wraps the reader's error in its task error; the run's caller (the
        # driver, `raybatch run`) reports a ConfigError by its message alone.
        raise InputTooLarge(too_large) from None
    finally:
        found.close()  # its spill folder, if it made one, whatever happened


def _confirm(shards: list[Shard], config: RunConfig) -> Callable[[set], set]:
    """DuplicateScan's `confirm`: reads again, here, each shard that holds a claim it
    names, up to its last such line (only ids that repeat are named), and parses those."""

    def confirm(wanted: set[tuple[str, int]]) -> set[tuple[str, int]]:
        last: dict[str, int] = {}
        for name, line in wanted:
            last[name] = max(line, last.get(name, 0))

        def lines() -> Iterator[pa.Table]:
            for shard in shards:
                if shard.name in last:
                    for batch in _lines_here([shard], config):
                        yield batch
                        if batch["line"][-1].as_py() >= last[shard.name]:
                            break

        return claims_among(lines(), wanted, max_line_bytes=config.max_line_bytes,
                            max_custom_id_bytes=config.max_custom_id_bytes)

    return confirm


def _cause_of_type(error: BaseException, kind: type) -> Optional[str]:
    """The message of the first `kind` error in `error`'s chain (Ray's task errors keep
    the original as `.cause`), or None."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        original = getattr(error, "cause", None)
        # The first line: Ray Data appends its retry advice to the message.
        if isinstance(original, kind):
            return str(original).split("\n", 1)[0]
        if type(error) is kind:
            return str(error).split("\n", 1)[0]
        error = error.__cause__ or error.__context__ or (original if isinstance(original, BaseException) else None)
    return None


def _in_driver(shards: list[Shard], config: RunConfig) -> bool:
    return sum(s.size for s in shards) <= config.in_driver_bytes


def _prepare_args(config: RunConfig, scan: InputScan) -> dict:
    return {
        "max_line_bytes": config.max_line_bytes,
        "max_n": config.max_n,
        "job_defaults": config.inference_parameters.row_defaults(),
        "duplicates": frozenset(scan.duplicates),
        "max_custom_id_bytes": config.max_custom_id_bytes,
        "lora": config.lora.model_dump() if config.lora is not None else None,
        "images": ImageLimits(
            max_image_bytes=config.max_image_bytes,
            max_images_per_row=config.max_images_per_row,
            fetch_timeout_seconds=config.image_fetch_timeout_seconds,
            url_schemes=tuple(config.image_url_schemes),
        ),
        "task": config.engine.task,
        **row_bounds(config),
    }


def _prompts(config: RunConfig) -> Optional[dict]:
    """`prepare_requests`' `prompts`: how the job renders prompts before the engine."""
    rendering = prompt_rendering(config.engine, config.model)
    return rendering.model_dump() if rendering is not None else None


def _finish_args(config: RunConfig) -> dict:
    return {"model": config.served_model_name or config.model}


def _concurrent_batches(config: RunConfig, access: PoolAccess) -> int:
    """Enough batches at the pool to keep every replica fed with rows to spare (the
    pool's queue refills a replica's slot the moment a row finishes)."""
    engine, policy = config.engine, access.model.policy
    return engine.concurrent_batches or math.ceil(
        1.5 * policy.slots_per_replica / engine.admission_factor * policy.max_replicas / engine.batch_size
    )


def answered_batches(shards: list[Shard], config: RunConfig, access: PoolAccess, scan: InputScan, skip) -> Iterator[pa.Table]:
    """The job's output batches: through the pipeline in this process for a small
    input (pipeline/in_driver.py), through Ray Data for a larger one."""
    finish_args = _finish_args(config)
    if _in_driver(shards, config):
        prepare_args = _prepare_args(config, scan)
        # Prompts go as text until the job's first rows are answered: loading the
        # tokenizer (seconds of CPU, pipeline/prompts.py) then runs beside the engine,
        # not in front of the first rows (a warm job's first row came 2 to 5 s later).
        prompts = _prompts(config)
        answered = False

        def finish(table: pa.Table) -> pa.Table:
            nonlocal answered
            answered = True
            return finish_rows(table, **finish_args)

        return stream_in_driver(
            _lines_here(shards, config, skip),
            lambda table: prepare_requests(table, **prepare_args, prompts=prompts if answered else None),
            EngineStage(access.model_dump()),
            finish,
            config.engine.batch_size,
            _concurrent_batches(config, access),
        )
    return build_pipeline(shards, config, access, scan, skip).iter_batches(batch_format="pyarrow", batch_size=None)


def build_pipeline(shards: list[Shard], config: RunConfig, access: PoolAccess, scan: InputScan, skip) -> ray.data.Dataset:
    prepared = _lines(shards, config, skip).map_batches(
        prepare_requests, batch_format="pyarrow", fn_kwargs={**_prepare_args(config, scan), "prompts": _prompts(config)}
    )
    engine = config.engine
    # Blocks of one engine batch each (streaming, nothing materialized): a shard's lines
    # would otherwise travel as one block, so one task would hold them all and emit its
    # answers only when the last one is done.
    prepared = prepared.repartition(target_num_rows_per_block=engine.batch_size)
    concurrent = _concurrent_batches(config, access)
    # `max_concurrency` (batches the stage actor works on at once) has no named
    # parameter yet; ray.data.llm passes it the same way.
    warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated")
    answered = prepared.map_batches(
        EngineStage,
        batch_size=engine.batch_size,
        batch_format="pyarrow",
        fn_constructor_kwargs={"access": access.model_dump()},
        compute=ray.data.ActorPoolStrategy(size=1, max_tasks_in_flight_per_actor=2 * concurrent),
        max_concurrency=concurrent,
        num_cpus=0,
    )
    # batch_size=None: each engine batch moves on alone. Ray Data's default would hold
    # answered rows back until 1024 of them are there, delaying commits and progress.
    return answered.map_batches(finish_rows, batch_size=None, batch_format="pyarrow", fn_kwargs=_finish_args(config))


def run_job(
    config: RunConfig, on_progress: Optional[Callable[[OutputStatus], None]] = None, publish: bool = True
) -> RunSummary:
    """Run one job to the end (or to the output cap). Raises RaybatchError subclasses
    for settings that cannot work, before any engine starts. `publish=False` leaves
    writing results.jsonl/errors.jsonl from the parts to the caller."""
    started = time.monotonic()
    _check_job_defaults(config)
    shards = list_shards(config.input)
    ensure_ray()
    plan = cluster_plan(config)
    _claim_output(Location(config.output), config)
    # The service's shared pool, or one of the run's own, which lives as long as the run.
    own_pool = config.engine_pool is None
    pool_name = config.engine_pool or f"raybatch-run-{uuid.uuid4().hex[:12]}"
    pool = pool_handle(pool_name, detached=False) if own_pool else ray.get_actor(pool_name, namespace=NAMESPACE)
    access = PoolAccess(
        pool_name=pool_name,
        ticket=JobTicket(account=config.account, job=config.output, run_id=uuid.uuid4().hex, job_id=config.job_id or ""),
        model=job_pool_model(config, plan, fixed=own_pool),
    )
    pool.warm.remote(access.model)  # engines start while the input is scanned
    try:
        return _stream(config, shards, access, on_progress, publish, started)
    finally:
        if own_pool:
            ray.get(pool.shutdown.remote())
            ray.kill(pool)
        else:  # a failed run's queued rows would otherwise still take a shared replica's time
            pool.end_job.remote(access.ticket.job, access.ticket.run_id)


def _stream(
    config: RunConfig, shards: list[Shard], access: PoolAccess,
    on_progress: Optional[Callable[[OutputStatus], None]], publish: bool, started: float,
) -> RunSummary:
    """Scan, stream the pipeline into the writer, publish: the part of a run after the
    engines were asked for."""
    output = Location(config.output)
    # No restarts: a restarted writer would have lost its uncommitted buffer while the
    # stream moved on. A writer crash fails the run; running it again resumes. On the
    # driver's own node, so that only the loss of that node can take it away: a node
    # that died but is not yet marked dead would otherwise be as good as any other.
    # Created first: its process starts while the input is scanned and Ray Data starts.
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    writer = ray.remote(num_cpus=0, max_restarts=0, scheduling_strategy=here)(OutputWriter).remote(
        config.output,
        cap_bytes=config.output_cap_bytes,
        part_max_rows=config.part_max_rows,
        part_max_bytes=config.part_max_bytes,
        part_max_seconds=config.part_max_seconds,
        part_quiet_seconds=config.part_quiet_seconds,
        metric_labels=metrics.job_labels(config.job_id, config.account),
    )
    scan = scan_input(shards, config)
    inherited: dict = {}
    for earlier in config.skip_succeeded_in:
        succeeded_lines(load_commits(Location(earlier)), into=inherited)
    # A continuation owns only the lines its parent chain did not answer successfully.
    total = scan.lines - sum(len(lines) for lines in inherited.values())
    commits = load_commits(output)
    skip = committed_lines(commits, into=inherited)
    begun = writer.begin.remote(total)  # not waited for: Ray Data starts meanwhile
    status = None
    # What the writer will find committed (it has read the same parts); a new writer has
    # never reached the cap.
    remaining = total - progress_of(commits, total).total_processed_requests
    # Appends of many batches, not waited for one by one (bounded): see WriterFeed.
    feed = WriterFeed(writer.append.remote, ray.get)
    if remaining > 0:
        try:
            for batch in answered_batches(shards, config, access, scan, skip):
                if status is None:
                    status = ray.get(begun)
                    if on_progress:
                        on_progress(status)
                received = feed.add(batch)
                if received is not None:
                    status = received
                    if on_progress:
                        on_progress(status)
                if status.cap_reached:
                    break
        except Exception as error:
            start_error = _cause_of_type(error, EngineStartError)
            if start_error is None:
                raise
            raise EngineStartError(start_error) from None
    feed.drain()
    status = ray.get(writer.flush.remote())
    if on_progress:
        on_progress(status)
    ray.kill(writer)
    if publish:
        publish_files(output)
    missing = total - status.progress.total_processed_requests
    if missing and not status.cap_reached:
        # Never report a job complete that is not: every line must be in a file.
        raise IncompleteRunError(
            f"{missing} of {total} lines were not committed; run the same command "
            "again to process them (committed lines are skipped)"
        )
    return RunSummary(
        state="output_cap_reached" if status.cap_reached else "completed",
        status=status,
        blank_lines=scan.blank_lines,
        wall_seconds=time.monotonic() - started,
    )
