"""Issue 10, item 11: per-job bounds on expensive rows. A row over a bound is an error
row with the bound's own code and its custom_id; a row within every bound passes, and a
row that sets no max_tokens is capped at the job's bound, not the whole context."""

from __future__ import annotations

import json

import pyarrow as pa
import pytest

from raybatch.config import RunConfig
from raybatch.engines.vllm_engine import VllmEngine
from raybatch.pipeline.preprocess import prepare_requests
from raybatch.pipeline.rows import EngineRequest
from raybatch.protocol import (
    DEFAULT_MAX_JSON_SCHEMA_BYTES,
    DEFAULT_MAX_N,
    DEFAULT_MAX_OUTPUT_TOKENS,
    DEFAULT_MAX_TOP_LOGPROBS,
)

BOUNDS = {"max_n": 2, "max_output_tokens": 100, "max_top_logprobs": 3, "max_json_schema_bytes": 200}


def rows(*bodies, url="/v1/chat/completions", **bounds):
    lines = [json.dumps({"custom_id": f"r{i}", "url": url, "body": body}).encode() for i, body in enumerate(bodies)]
    table = pa.Table.from_pydict({"shard": ["s"] * len(lines), "line": list(range(1, len(lines) + 1)), "raw": lines})
    options = {**BOUNDS, **bounds}
    return prepare_requests(table, max_line_bytes=1 << 20, job_defaults={}, duplicates=frozenset(), **options).to_pylist()


def chat(**body):
    return {"messages": [{"role": "user", "content": "hi"}], **body}


def schema(size: int) -> dict:
    return {"type": "object", "description": "x" * size}


@pytest.mark.parametrize(
    "body, url, code, message",
    [
        (chat(n=3), "/v1/chat/completions", "n_too_large", "n must be at most 2; this request asks for 3"),
        (chat(max_tokens=101), "/v1/chat/completions", "max_tokens_too_large",
         "max_tokens must be at most 100, this job's limit; this request asks for 101"),
        (chat(max_completion_tokens=5000), "/v1/chat/completions", "max_tokens_too_large",
         "max_completion_tokens must be at most 100, this job's limit; this request asks for 5000"),
        (chat(min_tokens=101, max_tokens=50), "/v1/chat/completions", "max_tokens_too_large",
         "min_tokens must be at most 100, this job's limit; this request asks for 101"),
        (chat(logprobs=True, top_logprobs=4), "/v1/chat/completions", "logprobs_too_large",
         "top_logprobs must be at most 3, this job's limit; this request asks for 4"),
        ({"prompt": "hi", "logprobs": 20}, "/v1/completions", "logprobs_too_large",
         "logprobs must be at most 3, this job's limit; this request asks for 20"),
        (chat(response_format={"type": "json_schema", "json_schema": {"name": "s", "schema": schema(300)}}),
         "/v1/chat/completions", "json_schema_too_large", "json_schema is 334 bytes, over this job's limit of 200"),
    ],
)
def test_a_row_over_a_bound_is_an_error_row_with_its_own_code(body, url, code, message):
    [row] = rows(body, url=url)
    assert (row["custom_id"], row["error_code"], row["error_message"], row["request"]) == ("r0", code, message, None)


def test_rows_within_every_bound_pass():
    within = [
        chat(n=2, max_tokens=100, logprobs=True, top_logprobs=3),
        chat(logprobs=False, top_logprobs=20),  # alternatives off: nothing is computed
        {"prompt": "hi", "logprobs": 3},
        chat(response_format={"type": "json_schema", "json_schema": {"name": "s", "schema": schema(150)}}),
    ]
    got = rows(*within[:2], *within[3:]) + rows(within[2], url="/v1/completions")
    assert [row["error_code"] for row in got] == [None] * 4


def test_the_schema_counts_compact_so_spacing_in_the_line_costs_nothing():
    spaced = json.dumps({"custom_id": "a", "body": chat(response_format={
        "type": "json_schema", "json_schema": {"name": "s", "schema": schema(150)}})}, indent=40).replace("\n", " ")
    table = pa.Table.from_pydict({"shard": ["s"], "line": [1], "raw": [spaced.encode()]})
    [row] = prepare_requests(table, max_line_bytes=1 << 20, job_defaults={}, duplicates=frozenset(), **BOUNDS).to_pylist()
    assert row["error_code"] is None


def test_a_row_without_max_tokens_is_capped_at_the_bound_not_the_context():
    [capped, own] = rows(chat(), chat(max_tokens=7))
    assert json.loads(capped["request"])["max_tokens_cap"] == 100 and "max_tokens" not in json.loads(capped["request"])
    assert json.loads(own["request"])["max_tokens"] == 7 and "max_tokens_cap" not in json.loads(own["request"])

    engine = VllmEngine.__new__(VllmEngine)  # only _max_tokens is used: no model loaded
    engine.max_model_len = 4096
    request = EngineRequest.model_validate_json(capped["request"])
    assert engine._max_tokens(request, prompt_tokens=10) == 100
    assert engine._max_tokens(request, prompt_tokens=4050) == 46  # less room than the cap: the room
    assert engine._max_tokens(EngineRequest(custom_id="x", kind="chat", sampling={}), prompt_tokens=10) == 4086


def test_job_defaults_over_a_bound_fail_the_job_before_any_engine():
    from raybatch.exceptions import ConfigError
    from raybatch.runner import _check_job_defaults

    config = RunConfig(input="i", output="o", model="m", max_output_tokens=100,
                       inference_parameters={"maxTokens": 500})
    with pytest.raises(ConfigError, match="max_tokens must be at most 100"):
        _check_job_defaults(config)


def test_defaults_are_the_documented_ones():
    config = RunConfig(input="i", output="o", model="m")
    assert (config.max_n, config.max_output_tokens, config.max_top_logprobs, config.max_json_schema_bytes) == (
        DEFAULT_MAX_N, DEFAULT_MAX_OUTPUT_TOKENS, DEFAULT_MAX_TOP_LOGPROBS, DEFAULT_MAX_JSON_SCHEMA_BYTES
    ) == (16, 4096, 5, 32768)
    assert config.engine.request_timeout_seconds == 600 and config.engine.max_engine_failures_per_job == 5
