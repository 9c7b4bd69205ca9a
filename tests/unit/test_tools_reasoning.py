"""Tools and reasoning without an engine: what validation refuses (and with which code),
what the engine request carries, how the tiny model's template renders tool turns, and
how vLLM's parsers (through engines/chat_frontend.py) read fixed model outputs back, with
the tiny model's real tokenizer. The engine end of it is in
tests/integration/test_run_engine.py."""

from __future__ import annotations

import json

import pytest

from raybatch.exceptions import RowError
from raybatch.pipeline.preprocess import to_engine_request
from raybatch.pipeline.rows import Choice, EngineRequest, EngineResult
from raybatch.pipeline.validate import validate_line

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather of a city",
        "parameters": {"type": "object", "properties": {"city": {"enum": ["Paris", "Rome"]}}, "required": ["city"]},
    },
}
CLOCK = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}
NAMED = {"type": "function", "function": {"name": "get_weather"}}
CALL = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
HISTORY = [
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": None, "tool_calls": [CALL]},
    {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
]


def check(body, **bounds):
    raw = json.dumps({"custom_id": "t", "body": body}).encode()
    return validate_line(raw, max_line_bytes=1 << 20, max_n=4, job_defaults={}, **bounds)


def error_of(body, **bounds):
    with pytest.raises(RowError) as caught:
        check(body, **bounds)
    return caught.value.code, caught.value.message


def chat(**body):
    return {"messages": [{"role": "user", "content": "hi"}], **body}


@pytest.mark.parametrize(
    "body, says",
    [
        (chat(tools={"type": "function"}), "tools: Input should be a valid list"),
        (chat(tools=[]), "tools: List should have at least 1 item"),
        (chat(tools=[{"type": "retrieval"}]), "tools.0.type: Input should be 'function'"),
        (chat(tools=[{"type": "function", "function": {"description": "no name"}}]), "tools.0.function.name: Field required"),
        (chat(tools=[{"type": "function", "function": {"name": "has space"}}]), "tools.0.function.name: String should match"),
        (chat(tools=[WEATHER], tool_choice="sometimes"), "tool_choice"),
        (chat(tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "get_time"}}),
         "tool_choice names function 'get_time', which is not in tools (get_weather)"),
        (chat(tool_choice="required"), "tool_choice needs tools"),
        (chat(tools=[WEATHER], parallel_tool_calls="no"), "parallel_tool_calls: Input should be a valid boolean"),
        ({"messages": [{"role": "tool", "content": "sunny"}]}, "a tool message needs the tool_call_id"),
        ({"messages": [{"role": "user", "content": "x", "tool_calls": [CALL]}]}, "only assistant messages may carry tool_calls"),
        ({"messages": [{"role": "assistant", "tool_calls": [{"id": "c", "function": {"name": "f"}}]}]},
         "messages.0.tool_calls.0.function.arguments: Field required"),
    ],
)
def test_bad_tools_are_invalid_request_rows_that_say_where(body, says):
    code, message = error_of(body)
    assert code == "invalid_request"
    assert says in message


def test_tool_schemas_count_against_the_json_schema_bound():
    big = {**WEATHER, "function": {**WEATHER["function"], "parameters": {"type": "object", "description": "x" * 300}}}
    code, message = error_of(chat(tools=[big], tool_choice="auto"), max_json_schema_bytes=256)
    assert code == "json_schema_too_large"
    assert message.startswith("tools' parameter schemas are ") and "over this job's limit of 256" in message
    # With tool_choice "none" no grammar is built from them: no bound.
    check(chat(tools=[big], tool_choice="none"), max_json_schema_bytes=256)


def test_engine_request_carries_tools_and_tool_turns():
    body = {"messages": HISTORY, "tools": [WEATHER, CLOCK], "tool_choice": NAMED, "parallel_tool_calls": False}
    request = to_engine_request(check(body))
    assert request.tools == [WEATHER, CLOCK]
    assert request.tool_choice == NAMED
    assert request.parallel_tool_calls is False
    assert request.messages == HISTORY
    # A plain row is what it always was.
    plain = to_engine_request(check(chat()))
    assert plain.messages == [{"role": "user", "content": "hi"}]
    assert "tools" not in plain.model_dump(exclude_none=True)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from transformers import AutoTokenizer

    from raybatch.tiny_model import build_tiny_model

    return AutoTokenizer.from_pretrained(build_tiny_model(tmp_path_factory.mktemp("tiny"), seed=0))


def test_tiny_template_renders_tools_and_tool_turns_and_plain_chats_as_before(tokenizer):
    from raybatch.pipeline.prompts import render_chat

    plain = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    assert render_chat(tokenizer, plain) == "<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    text = render_chat(tokenizer, HISTORY, tools=[WEATHER])
    assert text.startswith("<|im_start|>system\n# Tools\n")
    assert json.dumps(WEATHER) in text
    assert '<|im_start|>assistant\n<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call><|im_end|>\n' in text
    assert text.endswith("<|im_start|>tool\n<tool_response>sunny</tool_response><|im_end|>\n<|im_start|>assistant\n")
    for token in ("<tool_call>", "</tool_call>", "<think>", "</think>"):
        assert len(tokenizer.encode(token, add_special_tokens=False)) == 1


def frontend(tokenizer, **parsers):
    from raybatch.engines.chat_frontend import ChatFrontend

    return ChatFrontend(tokenizer, None, **parsers)


def request(**fields):
    return EngineRequest(custom_id="t", kind="chat", messages=HISTORY[:1], sampling={}, **fields)


def read_back(front, req, text, finish="stop"):
    prepared = front.prepare(req)
    ids = front._tokenizer.encode(text, add_special_tokens=False)
    return prepared, front.finish(prepared, text, ids, finish)


CALL_TEXT = '<tool_call>{"name": "get_weather", "arguments": {"city": "Rome"}}</tool_call>'


@pytest.mark.parametrize(
    "choice, finish", [("required", "tool_calls"), ("auto", "tool_calls"), (NAMED, "stop")]
)
def test_hermes_calls_come_back_as_openai_tool_calls(tokenizer, choice, finish):
    front = frontend(tokenizer, tool_call_parser="hermes")
    prepared, parsed = read_back(front, request(tools=[WEATHER, CLOCK], tool_choice=choice), CALL_TEXT)
    assert parsed.content is None and parsed.reasoning_content is None and parsed.reasoning_tokens is None
    assert parsed.finish_reason == finish  # OpenAI: a named function keeps "stop"
    (call,) = parsed.tool_calls
    assert call["id"].startswith("call_") and len(call["id"]) == 29
    assert call["type"] == "function"
    assert call["function"] == {"name": "get_weather", "arguments": '{"city": "Rome"}'}
    if choice != "auto":  # forced: vLLM constrains the output to a call (a structural tag)
        tag = json.loads(prepared.structured_outputs.structural_tag)
        assert tag["format"]["at_least_one"] is True and "get_weather" in json.dumps(tag)


def test_parallel_tool_calls_false_keeps_one_call(tokenizer):
    front = frontend(tokenizer, tool_call_parser="hermes")
    two = CALL_TEXT + '<tool_call>{"name": "get_time", "arguments": {}}</tool_call>'
    _, parsed = read_back(front, request(tools=[WEATHER, CLOCK], tool_choice="auto"), two)
    assert [c["function"]["name"] for c in parsed.tool_calls] == ["get_weather", "get_time"]
    _, parsed = read_back(front, request(tools=[WEATHER, CLOCK], tool_choice="auto", parallel_tool_calls=False), two)
    assert [c["function"]["name"] for c in parsed.tool_calls] == ["get_weather"]


def test_tool_choice_none_and_plain_text_stay_content(tokenizer):
    front = frontend(tokenizer, tool_call_parser="hermes")
    _, parsed = read_back(front, request(tools=[WEATHER], tool_choice="none"), CALL_TEXT)
    assert (parsed.content, parsed.tool_calls, parsed.finish_reason) == (CALL_TEXT, None, "stop")
    _, parsed = read_back(front, request(tools=[WEATHER]), "just words", "length")
    assert (parsed.content, parsed.tool_calls, parsed.finish_reason) == ("just words", None, "length")
    _, parsed = read_back(front, request(), CALL_TEXT)  # no tools: never parsed
    assert parsed.content == CALL_TEXT and parsed.tool_calls is None


@pytest.mark.parametrize("choice", [None, "auto", "required", NAMED])
def test_tools_on_a_model_without_a_tool_parser_are_refused_as_vllm_does(tokenizer, choice):
    front = frontend(tokenizer)
    with pytest.raises(RowError) as caught:
        front.prepare(request(tools=[WEATHER], tool_choice=choice))
    assert caught.value.code == "tools_not_supported"
    assert "engine_args.tool_call_parser" in caught.value.message
    # tool_choice "none" renders the tools and answers in text.
    _, parsed = read_back(front, request(tools=[WEATHER], tool_choice="none"), "text")
    assert parsed.content == "text"


@pytest.mark.parametrize(
    "parser, text, reasoning, content",
    [
        ("deepseek_r1", "<think>let me see</think>It is sunny.", "let me see", "It is sunny."),
        # The template opened <think>: no start marker in the output.
        ("deepseek_r1", "let me see</think>It is sunny.", "let me see", "It is sunny."),
        ("deepseek_r1", "still thinking", "still thinking", None),  # cut before </think>
        ("qwen3", "<think>let me see</think>It is sunny.", "let me see", "It is sunny."),
    ],
)
def test_reasoning_is_split_from_content_and_counted(tokenizer, parser, text, reasoning, content):
    front = frontend(tokenizer, reasoning_parser=parser)
    prepared, parsed = read_back(front, request(), text)
    assert (parsed.reasoning_content, parsed.content) == (reasoning, content)
    # The reasoning's own tokens: not the markers, not the content.
    assert parsed.reasoning_tokens == len(tokenizer.encode(reasoning, add_special_tokens=False))
    assert prepared.engine_kwargs["reasoning_ended"] is False  # the grammar waits for </think>


def test_usage_reports_reasoning_tokens_only_for_reasoning_models():
    from raybatch.pipeline.postprocess import build_response_body

    def body(**fields):
        result = EngineResult(prompt_tokens=5, cached_tokens=0, choices=[Choice(text="a", finish_reason="stop", completion_tokens=7, **fields)])
        return json.loads(build_response_body(result, chat=True, model="m", created=0).model_dump_json())

    plain = body()
    assert "completion_tokens_details" not in plain["usage"]
    assert plain["choices"][0]["message"] == {"role": "assistant", "content": "a"}
    thinking = body(reasoning_content="hm", reasoning_tokens=4)
    assert thinking["usage"]["completion_tokens_details"] == {"reasoning_tokens": 4}
    assert thinking["usage"]["completion_tokens"] == 7  # reasoning included, as OpenAI counts
    assert thinking["choices"][0]["message"] == {"role": "assistant", "content": "a", "reasoning_content": "hm"}
