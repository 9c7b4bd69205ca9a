"""Embeddings rows without an engine: validation and its exact codes, the engine
request, and the output line (OpenAI's embeddings response inside the batch envelope)."""

from __future__ import annotations

import base64
import json

import numpy as np
import pyarrow as pa
import pytest

from raybatch.config import EngineConfig
from raybatch.exceptions import RowError
from raybatch.pipeline.embeddings import encode_embedding
from raybatch.pipeline.postprocess import finish_rows
from raybatch.pipeline.preprocess import prepare_requests, to_engine_request
from raybatch.pipeline.rows import ENGINE_SCHEMA, EngineRequest, EngineResult
from raybatch.pipeline.validate import validate_line
from raybatch.precision import NodeResources, plan_engines
from raybatch.protocol import MAX_EMBEDDING_INPUTS, Precision

URL = "/v1/embeddings"


def check(body, *, url=URL, task="embed", job_defaults=None):
    raw = json.dumps({"custom_id": "e", "url": url, "body": body}).encode()
    return validate_line(raw, max_line_bytes=1 << 22, max_n=4, job_defaults=job_defaults or {}, task=task)


def code_of(body, **kwargs):
    with pytest.raises(RowError) as caught:
        check(body, **kwargs)
    assert caught.value.custom_id == "e"
    return caught.value.code


@pytest.mark.parametrize(
    "body, inputs",
    [
        ({"input": "hello"}, ["hello"]),
        ({"input": ["a", "b"]}, ["a", "b"]),
        ({"input": [5, 6, 7]}, [[5, 6, 7]]),
        ({"input": [[5], [6, 7]]}, [[5], [6, 7]]),
        # `model` and `user` are accepted and ignored; the job's sampling defaults too.
        ({"input": "x", "model": "other", "user": "u-1"}, ["x"]),
    ],
)
def test_every_input_shape_becomes_one_item_each(body, inputs):
    request = to_engine_request(check(body, job_defaults={"max_tokens": 8, "temperature": 0.5}))
    assert request == EngineRequest(custom_id="e", kind="embedding", inputs=inputs, sampling={}, encoding_format="float")


def test_dimensions_and_encoding_format_reach_the_engine():
    request = to_engine_request(check({"input": "x", "dimensions": 64, "encoding_format": "base64"}))
    assert (request.dimensions, request.encoding_format) == (64, "base64")


@pytest.mark.parametrize(
    "body",
    [
        {},  # no input
        {"input": ""},
        {"input": []},
        {"input": ["a", ""]},
        {"input": [[1], []]},
        {"input": ["a", 1]},  # mixed
        {"input": [True, 2]},  # booleans are not token ids
        {"input": {"text": "a"}},
        {"input": ["a"] * (MAX_EMBEDDING_INPUTS + 1)},
        {"input": "x", "encoding_format": "int8"},
        {"input": "x", "dimensions": 0},
        {"input": "x", "dimensions": "64"},
    ],
)
def test_bad_bodies_are_invalid_request(body):
    assert code_of(body) == "invalid_request"


def test_a_model_answers_only_its_own_kind_of_row():
    chat = {"messages": [{"role": "user", "content": "hi"}]}
    assert code_of(chat, url="/v1/chat/completions") == "unsupported_url_for_model"
    assert code_of({"prompt": "hi"}, url="/v1/completions") == "unsupported_url_for_model"
    assert code_of({"input": "hi"}, task="generate") == "unsupported_url_for_model"
    # The model's kind is checked before the body: a job learns it sent the wrong file.
    assert code_of({"input": ""}, task="generate") == "unsupported_url_for_model"


def test_prepare_requests_passes_the_task_through():
    raw = json.dumps({"custom_id": "e", "url": URL, "body": {"input": "x"}}).encode()
    batch = pa.table({"shard": ["s"], "line": [1], "raw": [raw]})
    out = prepare_requests(batch, max_line_bytes=1024, max_n=4, job_defaults={}, duplicates=frozenset(), task="embed")
    assert out["error_code"].to_pylist() == [None]
    assert json.loads(out["request"][0].as_py())["kind"] == "embedding"
    chat_model = prepare_requests(batch, max_line_bytes=1024, max_n=4, job_defaults={}, duplicates=frozenset())
    assert chat_model["error_code"].to_pylist() == ["unsupported_url_for_model"]


def test_base64_is_little_endian_float32_of_the_float_list():
    vector = [0.1, -2.5, 3e-8, 1.0]
    floats = encode_embedding(vector, "float")
    assert floats == np.asarray(vector, dtype=np.float32).tolist()
    decoded = np.frombuffer(base64.b64decode(encode_embedding(vector, "base64")), dtype="<f4")
    assert decoded.tolist() == floats


def test_the_output_line_is_openais_embeddings_response():
    result = EngineResult(prompt_tokens=7, cached_tokens=3, embeddings=[[0.5, -0.25], "AAAAPwAAgL4="])
    batch = pa.Table.from_pydict(
        {"shard": ["in.jsonl"], "line": [4], "custom_id": ["e"], "kind": ["embedding"],
         "result": [result.model_dump_json()], "error_code": [None], "error_message": [None]},
        schema=ENGINE_SCHEMA,
    )
    out = finish_rows(batch, model="tiny-embed")
    line = json.loads(out["output"][0].as_py())
    assert line["error"] is None and line["custom_id"] == "e"
    assert line["response"]["status_code"] == 200
    assert line["response"]["body"] == {
        "object": "list",
        "data": [
            {"object": "embedding", "index": 0, "embedding": [0.5, -0.25]},
            {"object": "embedding", "index": 1, "embedding": "AAAAPwAAgL4="},
        ],
        "model": "tiny-embed",
        "usage": {"prompt_tokens": 7, "total_tokens": 7},
    }
    # jobProgress counts what the line shows: no completion or cached tokens.
    assert (out["prompt_tokens"][0].as_py(), out["completion_tokens"][0].as_py(), out["cached_tokens"][0].as_py()) == (7, 0, 0)


def test_task_embed_runs_vllm_as_a_pooling_model():
    cpu = [NodeResources()]
    args = plan_engines(EngineConfig(task="embed"), Precision.PRECISION_UNSPECIFIED, cpu).engine_args
    assert (args["runner"], args["convert"]) == ("pooling", "embed")
    assert "runner" not in plan_engines(EngineConfig(), Precision.PRECISION_UNSPECIFIED, cpu).engine_args


class FakePoolingLLM:
    """AsyncLLM.encode's shape: an async generator of outputs whose `outputs.data` is
    the pooled vector. Each item's vector is [its first token id, 0]; id 13 fails."""

    def __init__(self):
        from types import SimpleNamespace

        self.model_config = SimpleNamespace(pooler_config=None)
        self.cancelled = 0

    async def encode(self, prompt, params, request_id):
        import asyncio
        from types import SimpleNamespace

        import torch

        ids = prompt["prompt_token_ids"]
        try:
            await asyncio.sleep(0.01 * len(ids))  # later items may finish first
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        if ids[0] == 13:
            raise RuntimeError("pooler blew up")
        yield SimpleNamespace(outputs=SimpleNamespace(data=torch.tensor([float(ids[0]), 0.0], dtype=torch.bfloat16)))


def pooling_engine(llm):
    from raybatch.engines.vllm_engine import VllmEngine

    engine = object.__new__(VllmEngine)  # no real engine: only generate()'s routing
    engine._llm, engine._pooling, engine.max_model_len = llm, True, 8
    engine._tokenizer = type("Tokenizer", (), {"__len__": lambda self: 100, "encode": lambda self, t: [7] * len(t)})()
    return engine


def embedding_request(inputs, **fields):
    return EngineRequest(custom_id="e", kind="embedding", inputs=inputs, sampling={}, encoding_format="float", **fields)


def test_a_pooling_engine_keeps_the_items_order_and_counts_their_tokens():
    import asyncio

    result = asyncio.run(pooling_engine(FakePoolingLLM()).generate(embedding_request([[3, 1, 1, 1], [5], "ab"])))
    assert result.embeddings == [[3.0, 0.0], [5.0, 0.0], [7.0, 0.0]]
    assert result.prompt_tokens == 4 + 1 + 2


def test_a_pooling_engine_refuses_generation_and_bad_items():
    import asyncio

    engine = pooling_engine(FakePoolingLLM())
    chat = EngineRequest(custom_id="c", kind="chat", messages=[{"role": "user", "content": "hi"}], sampling={})
    cases = [
        (chat, "unsupported_url_for_model"),
        (embedding_request([[1] * 9]), "context_length_exceeded"),
        (embedding_request([[100]]), "invalid_request"),
    ]
    for request, code in cases:
        with pytest.raises(RowError) as caught:
            asyncio.run(engine.generate(request))
        assert caught.value.code == code


def test_one_failing_item_fails_the_row_and_cancels_the_others():
    import asyncio

    llm = FakePoolingLLM()
    with pytest.raises(RowError) as caught:
        asyncio.run(pooling_engine(llm).generate(embedding_request([[13], [1] * 8, [2] * 8])))
    assert (caught.value.code, caught.value.message) == ("engine_error", "RuntimeError: pooler blew up")
    assert llm.cancelled == 2


def test_an_adapter_cannot_answer_embeddings():
    import asyncio

    with pytest.raises(RowError) as caught:
        asyncio.run(pooling_engine(FakePoolingLLM()).generate(embedding_request(["a"], adapter="sql", adapter_path="/a")))
    assert caught.value.code == "invalid_request" and "'sql'" in caught.value.message


def test_embeddings_rows_have_their_own_prefix_key():
    from raybatch.pipeline.rows import prompt_prefix

    keys = {prompt_prefix(embedding_request([text]).model_dump_json()) for text in ("a", "b")}
    assert len(keys) == 2
