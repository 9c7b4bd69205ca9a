import json

import pytest

from raybatch.exceptions import RowError
from raybatch.pipeline.preprocess import to_engine_request
from raybatch.pipeline.validate import validate_line

LIMIT = 1 << 20


def check(raw, **kwargs):
    options = {"max_line_bytes": LIMIT, "max_n": 4, "job_defaults": {}} | kwargs
    if not isinstance(raw, (bytes, type(None))):
        raw = json.dumps(raw).encode()
    return validate_line(raw, **options)


def error_of(raw, **kwargs):
    with pytest.raises(RowError) as caught:
        check(raw, **kwargs)
    return caught.value.code, caught.value.custom_id, caught.value.message


def chat(**body):
    return {"messages": [{"role": "user", "content": "hi"}], **body}


@pytest.mark.parametrize(
    "raw, code, custom_id",
    [
        (None, "line_too_large", None),
        (b"{not json", "invalid_json", None),
        (b'{"custom_id": "\xff"}', "invalid_json", None),
        (b"[" * 100_000 + b"]" * 100_000, "invalid_json", None),
        (b'{"custom_id": "x", "n": ' + b"9" * 1_000_000 + b"}", "invalid_json", None),
        (b'"a string"', "invalid_request", None),
        ({"body": chat()}, "missing_custom_id", None),
        ({"custom_id": "", "body": chat()}, "missing_custom_id", None),
        ({"custom_id": ["x"], "body": chat()}, "missing_custom_id", None),
        ({"custom_id": "a"}, "invalid_request", "a"),
        ({"custom_id": "a", "body": "text"}, "invalid_request", "a"),
        ({"custom_id": "a", "body": {"messages": "hi"}}, "invalid_request", "a"),
        ({"custom_id": "a", "body": {"messages": []}}, "invalid_request", "a"),
        ({"custom_id": "a", "body": {"messages": [{"role": "robot", "content": "x"}]}}, "invalid_request", "a"),
        ({"custom_id": "a", "url": "/v1/completions", "body": {"prompt": 5}}, "invalid_request", "a"),
        ({"custom_id": "a", "url": "/v1/completions", "body": {"prompt": ""}}, "invalid_request", "a"),
        ({"custom_id": "a", "url": "/v1/moderations", "body": chat()}, "invalid_request", "a"),
        ({"custom_id": "a", "url": "/v1/embeddings", "body": {"input": "x"}}, "unsupported_url_for_model", "a"),
        ({"custom_id": "a", "method": "GET", "body": chat()}, "invalid_request", "a"),
        ({"custom_id": "a", "body": chat(max_tokens=-1)}, "invalid_request", "a"),
        ({"custom_id": "a", "body": chat(max_tokens=0)}, "invalid_request", "a"),
        ({"custom_id": "a", "body": chat(max_tokens="5")}, "invalid_request", "a"),
        (b'{"custom_id": "a", "body": {"messages": [{"role": "user", "content": "x"}], "temperature": NaN}}', "invalid_request", "a"),
        ({"custom_id": "a", "body": chat(temperature=-0.5)}, "invalid_request", "a"),
        ({"custom_id": "a", "body": chat(top_p=0)}, "invalid_request", "a"),
        ({"custom_id": "a", "body": chat(n=5)}, "n_too_large", "a"),
        ({"custom_id": "a", "body": chat(seed=1 << 63)}, "invalid_request", "a"),
        ({"custom_id": "a", "body": chat(seed=-(1 << 63) - 1)}, "invalid_request", "a"),
        ({"custom_id": "a", "body": chat(top_k=1 << 31)}, "invalid_request", "a"),
        ({"custom_id": "a", "body": chat(response_format={"type": "json_schema"})}, "invalid_request", "a"),
        ({"custom_id": "a", "body": chat(response_format={"type": "xml"})}, "invalid_request", "a"),
    ],
)
def test_each_bad_line_gets_its_code(raw, code, custom_id):
    assert error_of(raw)[:2] == (code, custom_id)


def test_duplicate_is_reported_with_its_custom_id():
    assert error_of({"custom_id": "a", "body": chat()}, is_duplicate=True)[:2] == ("duplicate_custom_id", "a")


def test_messages_say_which_field():
    assert "temperature" in error_of({"custom_id": "a", "body": chat(temperature=-1)})[2]
    assert "n must be at most 4" in error_of({"custom_id": "a", "body": chat(n=9)})[2]
    assert "1048576" in error_of(None)[2]


def test_job_defaults_fill_in_and_row_values_win():
    defaults = {"max_tokens": 16, "temperature": 0.5, "top_k": 5}
    request = to_engine_request(check({"custom_id": "a", "body": chat(temperature=0.0)}, job_defaults=defaults))
    assert request.max_tokens == 16
    assert request.sampling == {"temperature": 0.0, "top_k": 5}


def test_job_default_n_is_checked_against_the_limit():
    assert error_of({"custom_id": "a", "body": chat()}, job_defaults={"n": 9})[0] == "n_too_large"


def test_body_model_is_ignored_and_extras_pass():
    request = to_engine_request(check({"custom_id": "a", "body": chat(model="other", min_tokens=2, ignore_eos=True, stop="x")}))
    assert request.sampling == {"min_tokens": 2, "ignore_eos": True, "stop": ["x"]}


def test_completion_and_structured_output():
    request = to_engine_request(
        check({"custom_id": "c", "url": "/v1/completions", "body": {"prompt": [1, 2], "logprobs": 3, "max_completion_tokens": 4}})
    )
    assert (request.kind, request.prompt, request.max_tokens, request.sampling) == ("completion", [1, 2], 4, {"logprobs": 3})
    schema = {"type": "object"}
    request = to_engine_request(
        check({"custom_id": "s", "body": chat(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": schema}})})
    )
    assert request.structured_output == {"json": schema, "disable_any_whitespace": True}


def test_chat_logprobs_map_to_vllm_numbers():
    on = to_engine_request(check({"custom_id": "a", "body": chat(logprobs=True, top_logprobs=3)}))
    off = to_engine_request(check({"custom_id": "a", "body": chat(logprobs=False, top_logprobs=3)}))
    assert on.sampling == {"logprobs": 3} and off.sampling == {}


def test_text_parts_are_joined():
    request = to_engine_request(
        check({"custom_id": "a", "body": {"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]}})
    )
    assert request.messages == [{"role": "user", "content": "ab"}]
