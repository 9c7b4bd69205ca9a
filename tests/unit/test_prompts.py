"""Prompts rendered in the preprocess stage (pipeline/prompts.py), with the tiny model's
real tokenizer: the ids the engine receives are those the replica would have made
(engines/chat_frontend.py renders the same row for comparison), the rows keep what the
replica's parsers still read, a refused conversation is an error row, and rows go as
text while the tokenizer loads or where it cannot load. The engine end of it is in
tests/integration/test_prompts_in_pipeline.py."""

from __future__ import annotations

import json
import logging
import time

import pyarrow as pa
import pytest
from pydantic_core import to_json

from raybatch.config import EngineConfig
from raybatch.engines.chat_frontend import ChatFrontend
from raybatch.pipeline.preprocess import prepare_requests
from raybatch.pipeline.prompts import PromptRendering, prompt_rendering, ready_renderer
from raybatch.pipeline.rows import EngineRequest, prompt_prefix

WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {}}}}
CONVERSATION = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def rendering(tmp_path_factory) -> PromptRendering:
    from raybatch.tiny_model import build_tiny_model

    model = str(build_tiny_model(tmp_path_factory.mktemp("tiny"), seed=0))
    rendering = PromptRendering(tokenizer=model)
    assert ready_renderer(rendering, wait=True) is not None
    return rendering


def prepared(bodies: dict[str, dict], rendering: PromptRendering | None, **urls: str) -> dict[str, dict]:
    """custom_id → the engine request (or the error) the preprocess stage makes of each body."""
    raws = [json.dumps({"custom_id": cid, "url": urls.get(cid, "/v1/chat/completions"), "body": body}).encode()
            for cid, body in bodies.items()]
    table = pa.table({"shard": ["in.jsonl"] * len(raws), "line": list(range(len(raws))), "raw": raws})
    out = prepare_requests(table, max_line_bytes=1 << 20, max_n=4, job_defaults={}, duplicates=frozenset(),
                           prompts=rendering.model_dump() if rendering else None).to_pylist()
    return {row["custom_id"]: json.loads(row["request"]) if row["request"] else (row["error_code"], row["error_message"])
            for row in out}


def replicas_ids(rendering: PromptRendering, request: dict) -> list[int]:
    """What the replica itself makes of the same row rendered there (no ids given)."""
    tokenizer = ready_renderer(rendering).tokenizer
    front = ChatFrontend(tokenizer, tool_call_parser="hermes")
    return front.prepare(EngineRequest.model_validate(request)).prompt_ids


def test_a_chat_row_reaches_the_engine_as_the_replicas_own_token_ids(rendering):
    plain = {"messages": CONVERSATION, "max_tokens": 4}
    rendered, as_text = prepared({"c": plain}, rendering)["c"], prepared({"c": plain}, None)["c"]
    # Only the prompt differs: the messages became ids, and nothing else moved.
    assert "messages" not in rendered and as_text["messages"] == CONVERSATION
    assert {k: v for k, v in rendered.items() if k != "prompt_token_ids"} == {
        k: v for k, v in as_text.items() if k != "messages"}
    assert rendered["prompt_token_ids"] == replicas_ids(rendering, as_text)
    tokenizer = ready_renderer(rendering).tokenizer
    assert tokenizer.decode(rendered["prompt_token_ids"]) == (
        "<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    # The replica takes the ids as they are.
    assert replicas_ids(rendering, rendered) == rendered["prompt_token_ids"]
    # In EngineRequest's own order, as the replica validates it.
    assert to_json(rendered).decode() == EngineRequest.model_validate(rendered).model_dump_json(exclude_none=True)


def test_a_row_with_tools_keeps_what_the_tool_parser_reads(rendering):
    body = {"messages": CONVERSATION, "tools": [WEATHER], "tool_choice": "auto"}
    rendered, as_text = prepared({"t": body}, rendering)["t"], prepared({"t": body}, None)["t"]
    assert rendered["messages"] == CONVERSATION and rendered["tools"] == as_text["tools"]
    # The template writes the tools into the prompt: the ids hold them.
    assert rendered["prompt_token_ids"] == replicas_ids(rendering, as_text)
    assert "get_weather" in ready_renderer(rendering).tokenizer.decode(rendered["prompt_token_ids"])


def test_a_reasoning_model_keeps_the_messages(rendering):
    keeping = rendering.model_copy(update={"keep_messages": True})
    assert ready_renderer(keeping, wait=True) is not None
    rendered = prepared({"r": {"messages": CONVERSATION}}, keeping)["r"]
    assert rendered["messages"] == CONVERSATION and rendered["prompt_token_ids"]


def test_a_completions_text_is_tokenized_and_token_ids_are_left_alone(rendering):
    rows = prepared({"text": {"prompt": "hello there", "echo": True}, "ids": {"prompt": [5, 6, 7]}}, rendering,
                    text="/v1/completions", ids="/v1/completions")
    tokenizer = ready_renderer(rendering).tokenizer
    assert "prompt" not in rows["text"] and rows["text"]["echo"] is True
    assert rows["text"]["prompt_token_ids"] == tokenizer.encode("hello there")
    assert rows["ids"]["prompt"] == [5, 6, 7] and "prompt_token_ids" not in rows["ids"]


def test_a_conversation_the_template_refuses_is_an_error_row_before_the_engine(rendering):
    strict = rendering.model_copy(update={"chat_template": "{{ raise_exception('no ' + messages[0].role) }}"})
    assert ready_renderer(strict, wait=True) is not None
    rows = prepared({"bad": {"messages": CONVERSATION}, "ok": {"prompt": "x"}}, strict, ok="/v1/completions")
    assert rows["bad"] == ("invalid_request", "chat template refused: no system")
    assert rows["ok"]["prompt_token_ids"]


def test_rows_go_as_text_until_the_tokenizer_has_loaded(rendering):
    fresh = rendering.model_copy(update={"chat_template": "{{ messages[0].content }}"})  # a key not loaded yet
    assert "messages" in prepared({"c": {"messages": CONVERSATION}}, fresh)["c"]  # started the load, did not wait
    deadline = time.monotonic() + 60
    while ready_renderer(fresh) is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert prepared({"c": {"messages": CONVERSATION}}, fresh)["c"]["prompt_token_ids"] == (
        ready_renderer(fresh).tokenizer.encode("be brief", add_special_tokens=False))


def test_a_tokenizer_that_cannot_load_leaves_every_row_to_the_replica(tmp_path, caplog):
    missing = PromptRendering(tokenizer=str(tmp_path / "no-model"))
    with caplog.at_level(logging.WARNING, logger="raybatch.pipeline.prompts"):
        assert ready_renderer(missing, wait=True) is None
    assert "did not load in the pipeline" in caplog.text and "the engine renders the prompts" in caplog.text
    assert prepared({"c": {"messages": CONVERSATION}}, missing)["c"]["messages"] == CONVERSATION
    assert ready_renderer(missing) is None  # not tried again


def test_the_rendering_follows_the_engines_tokenizer_arguments():
    engine = EngineConfig(engine_args={"tokenizer": "/tok", "tokenizer_revision": "r1", "trust_remote_code": True,
                                       "chat_template": "/t.jinja", "reasoning_parser": "qwen3"})
    assert prompt_rendering(engine, "/model") == PromptRendering(
        tokenizer="/tok", revision="r1", trust_remote_code=True, chat_template="/t.jinja", keep_messages=True)
    assert prompt_rendering(EngineConfig(), "/model") == PromptRendering(tokenizer="/model")
    assert prompt_rendering(EngineConfig(tokenize_in_pipeline=False), "/model") is None
    assert prompt_rendering(EngineConfig(kind="scripted"), "/model") is None
    assert prompt_rendering(EngineConfig(task="embed"), "/model") is None


def test_rows_tokenized_alike_share_a_prefix_key():
    first = {"custom_id": "a", "kind": "chat", "prompt_token_ids": list(range(300)), "sampling": {}}
    second = {**first, "custom_id": "b", "prompt_token_ids": list(range(128)) + [7]}
    other = {**first, "prompt_token_ids": [9] + list(range(300))}
    key = prompt_prefix(json.dumps(first))
    assert key == prompt_prefix(json.dumps(second)) != prompt_prefix(json.dumps(other))
    assert prompt_prefix(json.dumps({**first, "adapter": "x"})) != key  # an adapter's cache is its own
