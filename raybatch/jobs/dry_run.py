"""A job's dry run (`POST .../batchInferenceJobs:validate`, `raybatch job create
--dry-run`): the create request checked as `create_job` checks it (model, input
dataset, continuation, parameters), then every line of the input read, scanned and
validated by the pipeline's own stages, in this process, as a job would; nothing is
written and no engine is asked. The report: lines, bad lines by error code, and the
input tokens of the valid ones.

Input tokens: counted with the model's own tokenizer when its catalog source is a
local folder that holds one (the chat template applied as the engine applies it),
else estimated as the request's bytes over `TOKEN_ESTIMATE_BYTES` (4); the report
says which. The dry run reads the whole dataset (up to the dataset size limit) in an
API thread: seconds per hundred MB.
"""

from __future__ import annotations

import collections
import functools
import json
import os
from typing import Callable, Literal, Optional

from raybatch.api.datasets import estimate_tokens
from raybatch.config import ServiceConfig
from raybatch.exceptions import ConfigError, FailedPrecondition, InvalidArgument
from raybatch.jobs.creation import job_fields
from raybatch.jobs.run_config import RunConfigBuilder
from raybatch.pipeline.rows import EngineRequest, column
from raybatch.protocol import CamelModel, InferenceParameters
from raybatch.resources import DATASETS, CreateJobRequest, DatasetState, parse_reference
from raybatch.storage import list_shards
from raybatch.store import Store


class DryRunReport(CamelModel):
    model: str
    input_dataset_id: str
    shards: int
    total_lines: int  # non-blank lines: each becomes one result or one error row
    blank_lines: int
    valid_lines: int
    bad_lines: dict[str, int]  # error code → lines, as a job's error file would hold them
    input_tokens: int  # of the valid lines
    input_tokens_method: Literal["tokenizer", "estimate"]


def dry_run(store: Store, config: ServiceConfig, account: str, request: CreateJobRequest) -> DryRunReport:
    from raybatch.engines.pool_handle import pool_name
    from raybatch.pipeline.preprocess import prepare_requests
    from raybatch.pipeline.validate import DuplicateScan, scan_custom_ids
    from raybatch.runner import _check_job_defaults, _confirm, _lines_here, _prepare_args

    configs = RunConfigBuilder(config, store, pool_name(config.storage))
    fields, _ = job_fields(store, config, configs, account, request)
    _, input_id = parse_reference(fields["input_dataset_id"], DATASETS, account)
    dataset = store.get_dataset(account, input_id)
    if dataset is None or dataset.state != DatasetState.READY:
        state = "missing" if dataset is None else dataset.state.value
        raise FailedPrecondition(f"input dataset {fields['input_dataset_id']} is {state}, not READY")
    try:
        run_config = configs.for_model(
            fields["model"],
            input=configs.input_url(fields["input_dataset_id"]),
            output=configs.files_url(fields["input_dataset_id"]),  # never written: nothing runs
            inference_parameters=fields.get("inference_parameters") or InferenceParameters(),
            precision=fields.get("precision") or "PRECISION_UNSPECIFIED",
        )
        _check_job_defaults(run_config)
        shards = list_shards(run_config.input)
    except ConfigError as error:
        raise InvalidArgument(str(error)) from None

    # The job's two passes: the custom_id scan (duplicates, blank lines), then stages 2-3.
    with DuplicateScan([shard.name for shard in shards]) as scan_state:
        scan_args = {"max_line_bytes": run_config.max_line_bytes, "max_custom_id_bytes": run_config.max_custom_id_bytes}
        for lines in _lines_here(shards, run_config):
            scan_state.add(scan_custom_ids(lines, **scan_args))
        from raybatch.runner import InputScan

        scan = InputScan(lines=scan_state.lines, blank_lines=scan_state.blank_lines,
                         duplicates=scan_state.duplicates(_confirm(shards, run_config)))
    count, method = _token_counter(run_config.model)
    bad: collections.Counter = collections.Counter()
    valid = tokens = 0
    prepare_args = _prepare_args(run_config, scan)
    for lines in _lines_here(shards, run_config):
        prepared = prepare_requests(lines, **prepare_args)
        for request_json, code in zip(column(prepared, "request"), column(prepared, "error_code")):
            if code is not None:
                bad[code] += 1
            else:
                valid += 1
                tokens += count(EngineRequest.model_validate_json(request_json))
    return DryRunReport(
        model=fields["model"], input_dataset_id=fields["input_dataset_id"], shards=len(shards),
        total_lines=valid + sum(bad.values()), blank_lines=scan.blank_lines, valid_lines=valid,
        bad_lines=dict(sorted(bad.items())), input_tokens=tokens, input_tokens_method=method,
    )


def _estimate(request: EngineRequest) -> int:
    text = request.prompt if request.prompt is not None else request.messages
    return estimate_tokens(len(json.dumps(text, ensure_ascii=False).encode()) if not isinstance(text, str)
                           else len(text.encode()))


def _token_counter(source: str) -> tuple[Callable[[EngineRequest], int], str]:
    tokenizer = _local_tokenizer(source)
    if tokenizer is None:
        return _estimate, "estimate"

    def count(request: EngineRequest) -> int:
        if isinstance(request.prompt, list):
            return len(request.prompt)  # token IDs already
        try:
            if request.messages is not None:
                return len(tokenizer.apply_chat_template(request.messages, tokenize=True, add_generation_prompt=True,
                                                          return_dict=False))
            return len(tokenizer.encode(request.prompt))
        except Exception:  # a message shape the template does not take: the engine says so
            return _estimate(request)

    return count, "tokenizer"


@functools.lru_cache(maxsize=8)
def _local_tokenizer(source: str) -> Optional[object]:
    """The tokenizer of a model in a local folder; None for anything else (a hub ID is
    not fetched for a dry run, and the scripted test engine has none)."""
    folder = os.path.expanduser(source.removeprefix("file://"))
    if not os.path.isfile(os.path.join(folder, "tokenizer_config.json")):
        return None
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(folder)
    except Exception:
        return None
