"""How VllmEngine sorts failures: a request's own failure is its error row; a dead
engine is not any row's fault and must escape (the pool replaces the replica)."""

import asyncio

import pytest

from raybatch.exceptions import RowError
from raybatch.engines.vllm_engine import VllmEngine
from raybatch.pipeline.rows import EngineRequest


class FailingLLM:
    def __init__(self, error):
        self.error = error

    async def generate(self, *args, **kwargs):
        raise self.error
        yield  # an async generator, like AsyncLLM.generate


class CountingTokenizer:
    def encode(self, text, add_special_tokens=True):
        return list(range(len(text.split())))

    def __len__(self):
        return 100


def engine_failing_with(error) -> VllmEngine:
    engine = object.__new__(VllmEngine)  # no real engine: only generate()'s error handling
    engine._llm = FailingLLM(error)
    engine._tokenizer = CountingTokenizer()
    engine.max_model_len = 64
    return engine


REQUEST = EngineRequest(custom_id="a", kind="completion", prompt="one two", sampling={}, max_tokens=4)


def test_a_request_failure_becomes_engine_error():
    with pytest.raises(RowError) as caught:
        asyncio.run(engine_failing_with(RuntimeError("kernel blew up")).generate(REQUEST))
    assert caught.value.code == "engine_error"
    assert caught.value.message == "RuntimeError: kernel blew up"


def test_vllm_input_checks_become_invalid_request():
    with pytest.raises(RowError) as caught:
        asyncio.run(engine_failing_with(ValueError("stop string too long")).generate(REQUEST))
    assert caught.value.code == "invalid_request"


def test_a_dead_engine_is_not_a_row_error():
    from vllm.v1.engine.exceptions import EngineDeadError

    from raybatch.exceptions import EngineFailure

    with pytest.raises(EngineFailure, match="vLLM engine died"):
        asyncio.run(engine_failing_with(EngineDeadError()).generate(REQUEST))


def test_context_overflow_is_caught_before_the_engine():
    long_prompt = EngineRequest(custom_id="b", kind="completion", prompt="w " * 70, sampling={})
    with pytest.raises(RowError) as caught:
        asyncio.run(engine_failing_with(AssertionError("engine must not be called")).generate(long_prompt))
    assert caught.value.code == "context_length_exceeded"
    assert "maximum context length is 64 tokens" in caught.value.message
