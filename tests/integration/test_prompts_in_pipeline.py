"""Prompts rendered in the pipeline (pipeline/prompts.py) on the real vLLM CPU engine:
the same input runs twice on the service's warm `tiny` replica, once with its prompts
rendered and tokenized in this process (the preprocess stage) and once rendered by the
replica. The engine gets the same prompts either way, and every row is answered."""

from __future__ import annotations

import pytest

import raybatch.runner
from raybatch.config import EngineConfig, RunConfig
from raybatch.engines.pool_handle import pool_name
from raybatch.pipeline.prompts import prompt_rendering, ready_renderer
from raybatch.runner import run_job
from tests.helpers import WEATHER_TOOL, InputBuilder, chat, check_run, read_jsonl

pytestmark = pytest.mark.engine

# The catalog's `tiny` engine arguments (tests/helpers.py SERVICE_MODELS): its warm replica.
ENGINE_ARGS = {"enforce_eager": True, "tool_call_parser": "hermes"}
PREPARE = raybatch.runner.prepare_requests  # the stage itself, under the spy of each run


def _input() -> InputBuilder:
    """Three shards: the read stage gives each its own table, so the preprocess stage
    sees them one by one."""
    built = InputBuilder()
    for i in range(6):
        built.ok("a.jsonl" if i < 3 else "b.jsonl", f"plain-{i}", chat(f"count to {i}", max_tokens=4, temperature=0))
    built.ok("b.jsonl", "turns", {"messages": [
        {"role": "system", "content": "answer in one word"}, {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"}, {"role": "user", "content": "again"}], "max_tokens": 4})
    built.ok("c.jsonl", "tools", {"messages": [{"role": "user", "content": "weather?"}], "tools": [WEATHER_TOOL],
                                  "tool_choice": "required", "parallel_tool_calls": False, "seed": 1,
                                  "max_tokens": 100, "temperature": 1.0})  # as tests/helpers.py tool_rows
    built.ok("c.jsonl", "echo", {"prompt": "once upon a time", "max_tokens": 2, "echo": True},
             url="/v1/completions")
    return built


def _run(root, tiny_model: str, service, in_pipeline: bool, monkeypatch) -> tuple[dict, dict[str, str]]:
    """(custom_id → result line, custom_id → the request the preprocess stage handed the engine)."""
    built = _input()
    built.write(str(root / "in"))
    # One row at a time: the second shard is prepared only after the first rows are
    # answered, when the pipeline starts rendering (runner.answered_batches).
    engine = EngineConfig(engine_args=ENGINE_ARGS, tokenize_in_pipeline=in_pipeline, batch_size=1,
                          concurrent_batches=1)
    if in_pipeline:  # loaded before the run: every row prepared once it may render goes as ids
        assert ready_renderer(prompt_rendering(engine, tiny_model), wait=True) is not None
    requests: dict[str, str] = {}

    def spied(table, **args):
        prepared = PREPARE(table, **args)
        requests.update((row["custom_id"], row["request"]) for row in prepared.to_pylist() if row["request"])
        return prepared

    monkeypatch.setattr(raybatch.runner, "prepare_requests", spied)
    config = RunConfig(input=str(root / "in"), output=str(root / "out"), model=tiny_model, engine=engine,
                       engine_pool=pool_name(service.storage), part_max_rows=4)
    assert run_job(config).state == "completed"
    check_run(str(root / "out"), built.expected)
    return {row["custom_id"]: row for row in read_jsonl(f"{root}/out/results.jsonl")}, requests


def test_token_ids_from_the_pipeline_give_the_engine_the_prompts_it_would_have_made(
    ray_cluster, service, tiny_model, tmp_path, monkeypatch
):
    as_ids, sent_ids = _run(tmp_path / "ids", tiny_model, service, True, monkeypatch)
    as_text, sent_text = _run(tmp_path / "text", tiny_model, service, False, monkeypatch)

    assert set(sent_ids) == set(sent_text) == set(as_ids)
    # The first shard was prepared before any row was answered: as text, as with the
    # setting off. Every later row reached the engine as token ids.
    as_text_first = {f"plain-{i}" for i in range(3)}
    assert {cid for cid, r in sent_ids.items() if '"prompt_token_ids"' not in r} == as_text_first
    assert not any('"prompt_token_ids"' in r for r in sent_text.values())
    assert set(as_ids) == set(as_text) == {*(f"plain-{i}" for i in range(6)), "turns", "tools", "echo"}
    for custom_id, row in as_ids.items():
        body, other = row["response"]["body"], as_text[custom_id]["response"]["body"]
        assert body["usage"]["prompt_tokens"] == other["usage"]["prompt_tokens"] > 0, custom_id
    # The echoed prompt is decoded from the ids the engine got.
    assert as_ids["echo"]["response"]["body"]["choices"][0]["text"].startswith("once upon a time")
    # The tool parser still reads the forced call back (it keeps the row's messages and tools).
    for rows in (as_ids, as_text):
        message = rows["tools"]["response"]["body"]["choices"][0]["message"]
        assert [call["function"]["name"] for call in message["tool_calls"]] == ["get_weather"]
