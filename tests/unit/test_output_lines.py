"""The postprocess stage writes output lines from plain dicts (pipeline/postprocess.py);
the protocol's pydantic models define them. Each line here must be byte for byte what
`BatchOutputLine(...).model_dump_json()` writes for the same engine answer and the
same ids, and must validate as a BatchOutputLine: plain, logprobs, tools, reasoning,
several choices, echo, adapters, embeddings and error rows."""

from __future__ import annotations

import json
import math
import re

import pyarrow as pa
import pytest

from raybatch.pipeline.embeddings import build_embedding_body
from raybatch.pipeline.postprocess import build_response_body, finish_rows
from raybatch.pipeline.rows import ENGINE_SCHEMA, Choice, EngineResult, TokenLogprob, TopLogprob
from raybatch.protocol import DEFAULT_MAX_OUTPUT_TOKENS, BatchError, BatchOutputLine, BatchResponse

HEX32 = re.compile(r"[0-9a-f]{32}")


def _logprobs(*tokens: str) -> list[TokenLogprob]:
    # Values whose JSON forms differ between json.dumps and pydantic (1e-05, 1e+16), and
    # a non-ASCII token.
    values = [-1e-05, -0.0, -1.2345678901234567, -1e16, -3.0]
    return [
        TokenLogprob(
            token=t,
            logprob=values[i % len(values)],
            bytes=list(t.encode()),
            top=[TopLogprob(token=t, logprob=values[i % len(values)], bytes=list(t.encode())),
                 TopLogprob(token="ü", logprob=-7.5, bytes=[195, 188])],
        )
        for i, t in enumerate(tokens)
    ]


CALL = {"id": "call_1", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}  # type defaulted

RESULTS = {
    "plain chat": ("chat", EngineResult(prompt_tokens=4, cached_tokens=0, choices=[
        Choice(text="hi there", finish_reason="length", completion_tokens=8)])),
    "chat, odd text": ("chat", EngineResult(prompt_tokens=4, cached_tokens=2, choices=[
        Choice(text='é "quoted"\n\t\x01 \u2028 😀 \\', finish_reason="stop", completion_tokens=3)])),
    "chat with logprobs": ("chat", EngineResult(prompt_tokens=4, cached_tokens=0, choices=[
        Choice(text="ab ü", finish_reason="stop", completion_tokens=3, logprobs=_logprobs("ab", " ", "ü"))])),
    "chat, tools": ("chat", EngineResult(prompt_tokens=9, cached_tokens=0, choices=[
        Choice(text=None, finish_reason="tool_calls", completion_tokens=12, tool_calls=[CALL, {**CALL, "id": "call_2"}])])),
    "chat, reasoning": ("chat", EngineResult(prompt_tokens=5, cached_tokens=0, choices=[
        Choice(text="a", finish_reason="stop", completion_tokens=7, reasoning_content="hm", reasoning_tokens=4)])),
    "chat, reasoning and tools, two choices": ("chat", EngineResult(prompt_tokens=5, cached_tokens=1, choices=[
        Choice(text="a", finish_reason="stop", completion_tokens=7, reasoning_content="", reasoning_tokens=0),
        Choice(text=None, finish_reason="tool_calls", completion_tokens=3, tool_calls=[CALL])])),
    "chat, no choices": ("chat", EngineResult(prompt_tokens=5, cached_tokens=0)),
    "chat, adapter": ("chat", EngineResult(prompt_tokens=4, cached_tokens=0, adapter="tiny-lora", choices=[
        Choice(text="x", finish_reason="stop", completion_tokens=1)])),
    "completion": ("completion", EngineResult(prompt_tokens=3, cached_tokens=0, choices=[
        Choice(text=" world", finish_reason="length", completion_tokens=2)])),
    "completion, echo, logprobs, n=2": ("completion", EngineResult(prompt_tokens=3, cached_tokens=0, prompt_text="héllo", choices=[
        Choice(text=" wörld", finish_reason="length", completion_tokens=2, logprobs=_logprobs(" w", "örld")),
        Choice(text=None, finish_reason="stop", completion_tokens=0, logprobs=[])])),
    "embedding, floats": ("embedding", EngineResult(prompt_tokens=3, cached_tokens=0, embeddings=[[0.1, -1e-05, 2.5e16], [0.0]])),
    "embedding, base64": ("embedding", EngineResult(prompt_tokens=3, cached_tokens=0, embeddings=["AACAPw=="])),
}

ERRORS = {
    "error row": ("r9", "invalid_request", "messages: Field required", 7, "in.jsonl"),
    "error row, no custom_id": (None, "invalid_json", 'line is not valid JSON: Expecting value: line 1 column 1 (char 0) é "x"', 1, "a/b.jsonl"),
}


def _finished(rows: list[tuple]) -> list[dict]:
    """finish_rows over ENGINE_SCHEMA rows (custom_id, kind, result JSON, code, message, line, shard)."""
    table = pa.Table.from_pydict({
        "shard": [r[6] for r in rows], "line": [r[5] for r in rows], "custom_id": [r[0] for r in rows],
        "kind": [r[1] for r in rows], "result": [r[2] for r in rows],
        "error_code": [r[3] for r in rows], "error_message": [r[4] for r in rows],
    }, schema=ENGINE_SCHEMA)
    return finish_rows(table, model="base").to_pylist()


def _oracle(out: dict, custom_id, kind, result: EngineResult, created: int) -> str:
    """The line the models write, with the fast line's own random ids."""
    fast = json.loads(out["output"])
    if kind == "embedding":
        body = build_embedding_body(result, model="base")
    else:
        body = build_response_body(result, chat=kind == "chat", model=result.adapter or "base", created=created)
        body.id = fast["response"]["body"]["id"]
    return BatchOutputLine(
        id=fast["id"], custom_id=custom_id,
        response=BatchResponse(status_code=200, request_id=fast["response"]["request_id"], body=body), error=None,
    ).model_dump_json()


@pytest.mark.parametrize("name", sorted(RESULTS))
def test_a_result_line_is_the_models_dump_byte_for_byte(name):
    kind, result = RESULTS[name]
    [out] = _finished([(f"id-{name}", kind, result.model_dump_json(), None, None, 3, "in.jsonl")])
    fast = json.loads(out["output"])
    created = fast["response"]["body"].get("created", 0)
    assert out["output"] == _oracle(out, f"id-{name}", kind, result, created)
    BatchOutputLine.model_validate_json(out["output"])
    assert HEX32.fullmatch(fast["id"].removeprefix("batch_req_"))
    assert HEX32.fullmatch(fast["response"]["request_id"].removeprefix("req_"))
    if kind != "embedding":
        assert HEX32.fullmatch(fast["response"]["body"]["id"].split("-", 1)[1])
        completion = sum(c.completion_tokens for c in result.choices)
        assert (out["prompt_tokens"], out["completion_tokens"], out["cached_tokens"]) == (
            result.prompt_tokens, completion, result.cached_tokens)
    else:
        assert (out["prompt_tokens"], out["completion_tokens"], out["cached_tokens"]) == (result.prompt_tokens, 0, 0)
    assert out["is_error"] is False


@pytest.mark.parametrize("name", sorted(ERRORS))
def test_an_error_line_is_the_models_dump_byte_for_byte(name):
    custom_id, code, message, line, shard = ERRORS[name]
    [out] = _finished([(custom_id, None, None, code, message, line, shard)])
    fast = json.loads(out["output"])
    oracle = BatchOutputLine(
        id=fast["id"], custom_id=custom_id, response=None,
        error=BatchError(code=code, message=message, line=line, file=shard),
    ).model_dump_json()
    assert out["output"] == oracle
    assert HEX32.fullmatch(fast["id"].removeprefix("batch_req_"))
    assert (out["is_error"], out["prompt_tokens"], out["completion_tokens"], out["cached_tokens"]) == (True, 0, 0, 0)


def test_an_unknown_error_code_is_refused_as_the_model_refuses_it():
    with pytest.raises(ValueError):
        _finished([("r1", None, None, "no_such_code", "m", 1, "in.jsonl")])


def test_an_infinite_logprob_is_written_as_null_as_the_models_write_it():
    # vLLM may answer -inf for a token the sampler ruled out.
    result = RESULTS["chat with logprobs"][1].model_dump()
    result["choices"][0]["logprobs"][0]["logprob"] = -math.inf
    [out] = _finished([("r1", "chat", json.dumps(result), None, None, 1, "in.jsonl")])
    assert json.loads(out["output"])["response"]["body"]["choices"][0]["logprobs"]["content"][0]["logprob"] is None


def test_every_id_of_a_batch_is_its_own():
    rows = [(f"r{i}", "chat", RESULTS["plain chat"][1].model_dump_json(), None, None, i, "in.jsonl") for i in range(50)]
    lines = [json.loads(out["output"]) for out in _finished(rows)]
    ids = [x["id"] for x in lines] + [x["response"]["request_id"] for x in lines] + [x["response"]["body"]["id"] for x in lines]
    assert len(set(ids)) == 150


# ------------------------------------------------------ engine requests (preprocess)

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hé\n"}]
TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {}}}}
SCHEMA = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object", "properties": {"a": {"type": "integer"}}}}}
BODIES = {
    "plain chat": ("/v1/chat/completions", {"messages": CHAT, "max_tokens": 8}),
    "chat, every sampling field": ("/v1/chat/completions", {
        "messages": CHAT, "max_completion_tokens": 9, "temperature": 0.0, "top_p": 0.5, "top_k": 3, "n": 2,
        "stop": "x", "seed": 7, "presence_penalty": 0.1, "frequency_penalty": -0.1, "repetition_penalty": 1.1,
        "min_tokens": 1, "ignore_eos": True, "logprobs": True, "top_logprobs": 2}),
    "chat, no max_tokens (capped)": ("/v1/chat/completions", {"messages": CHAT}),
    "chat, tools and a tool turn": ("/v1/chat/completions", {
        "messages": [*CHAT, {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}]},
            {"role": "tool", "content": "sunny", "tool_call_id": "c1"}],
        "tools": [TOOL], "tool_choice": {"type": "function", "function": {"name": "get_weather"}}, "parallel_tool_calls": False}),
    "chat, json_schema": ("/v1/chat/completions", {"messages": CHAT, "response_format": SCHEMA}),
    "chat, json_object, logprobs off": ("/v1/chat/completions", {"messages": CHAT, "response_format": {"type": "json_object"}, "logprobs": False}),
    "completion, echo, logprobs, stop list": ("/v1/completions", {"prompt": "Once", "echo": True, "logprobs": 2, "stop": ["a", "b"], "max_tokens": 4}),
    "completion, token ids": ("/v1/completions", {"prompt": [1, 2, 3]}),
}


@pytest.mark.parametrize("name", sorted(BODIES))
@pytest.mark.parametrize("adapter", [None, "sql"])
def test_an_engine_request_is_the_models_dump_byte_for_byte(name, adapter):
    from raybatch.adapters import AdapterRouting
    from raybatch.pipeline.preprocess import prepare_requests, to_engine_request
    from raybatch.pipeline.validate import validate_line

    url, body = BODIES[name]
    raw = json.dumps({"custom_id": "r1", "url": url, "body": {**body, **({"model": adapter} if adapter else {})}}).encode()
    routing = AdapterRouting(adapters={"sql": "/adapters/sql"}) if adapter else None
    table = pa.table({"shard": ["in.jsonl"], "line": [1], "raw": [raw]})
    [row] = prepare_requests(table, max_line_bytes=1 << 20, max_n=4, job_defaults={"temperature": 0.5},
                             duplicates=frozenset(), lora=routing.model_dump() if routing else None).to_pylist()
    assert row["error_code"] is None, row
    # The model path: validated, built and dumped as pydantic models.
    validated = validate_line(raw, max_line_bytes=1 << 20, max_n=4, job_defaults={"temperature": 0.5})
    model = to_engine_request(validated, DEFAULT_MAX_OUTPUT_TOKENS)
    if adapter:
        model = model.model_copy(update={"adapter": "sql", "adapter_path": "/adapters/sql"})
    assert row["request"] == model.model_dump_json(exclude_none=True)


def test_an_embedding_request_is_the_models_dump_byte_for_byte():
    from raybatch.pipeline.preprocess import prepare_requests, to_engine_request
    from raybatch.pipeline.validate import validate_line

    raw = json.dumps({"custom_id": "e", "url": "/v1/embeddings", "body": {"input": ["a", "b"], "dimensions": 8,
                                                                          "encoding_format": "base64"}}).encode()
    table = pa.table({"shard": ["in.jsonl"], "line": [1], "raw": [raw]})
    [row] = prepare_requests(table, max_line_bytes=1 << 20, max_n=4, job_defaults={}, duplicates=frozenset(),
                             task="embed").to_pylist()
    validated = validate_line(raw, max_line_bytes=1 << 20, max_n=4, job_defaults={}, task="embed")
    assert row["request"] == to_engine_request(validated).model_dump_json(exclude_none=True)
