"""Stage 4 — engine: answer requests with an inference engine inside a Ray actor.

`EngineStage` is the `map_batches` callable: Ray Data keeps a pool of them (one per
replica, each with its GPUs) and sends each actor several batches at once. Inside, every
row of every batch is its own request to an async vLLM engine, so the engine always has
many requests in flight and a slow row holds back only its own batch, never the engine.

An engine is anything with the `Engine` interface; `VllmEngine` is the real one.
"""

from __future__ import annotations

import asyncio
import logging
import os
import uuid
from typing import Any, Optional, Protocol

import pyarrow as pa
from pydantic import BaseModel

from raybatch.exceptions import EngineFailure, RowError
from raybatch.pipeline.engine_failures import EngineGate, FailureLog, RowKey, poison_message
from raybatch.pipeline.preprocess import EngineRequest
from raybatch.pipeline.rows import ENGINE_SCHEMA, column
from raybatch.protocol import ErrorCode

logger = logging.getLogger(__name__)


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprob(TopLogprob):
    top: list[TopLogprob]


class Choice(BaseModel):
    text: str
    finish_reason: Optional[str]
    completion_tokens: int
    logprobs: Optional[list[TokenLogprob]] = None


class EngineResult(BaseModel):
    prompt_tokens: int
    cached_tokens: int
    prompt_text: Optional[str] = None  # only for completions with `echo`
    choices: list[Choice]


class Engine(Protocol):
    async def generate(self, request: EngineRequest) -> EngineResult:
        """Answer one request. Raises RowError for a request this engine cannot answer;
        any other exception means the engine itself is in trouble."""


class VllmEngine:
    """vLLM's async engine (v1 `AsyncLLM`): continuous batching over every request in
    flight, prefix caching on, the model's own chat template."""

    def __init__(self, model: str, engine_args: dict[str, Any], cpu_kv_cache_gib: int):
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(cpu_kv_cache_gib))
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        args = dict(engine_args)
        if args.get("tensor_parallel_size", 1) > 1:
            # The actor holds all of the replica's GPUs; workers are its own processes.
            args.setdefault("distributed_executor_backend", "mp")
        self._llm = AsyncLLM.from_engine_args(AsyncEngineArgs(model=model, **args))
        self._tokenizer = self._llm.tokenizer
        self.max_model_len = self._llm.model_config.max_model_len

    def _prompt_ids(self, request: EngineRequest) -> list[int]:
        tokenizer = self._tokenizer
        if request.kind == "chat":
            try:
                text = tokenizer.apply_chat_template(
                    request.messages, add_generation_prompt=True, tokenize=False
                )
            except Exception as exc:  # a template may refuse e.g. a role order
                raise RowError(ErrorCode.INVALID_REQUEST, f"chat template refused: {exc}") from None
            return tokenizer.encode(text, add_special_tokens=False)
        if isinstance(request.prompt, str):
            return tokenizer.encode(request.prompt)
        vocab = len(tokenizer)
        if any(not 0 <= token < vocab for token in request.prompt):
            raise RowError(ErrorCode.INVALID_REQUEST, f"prompt token ids must be in [0, {vocab})")
        return list(request.prompt)

    def _max_tokens(self, request: EngineRequest, prompt_tokens: int) -> int:
        room = self.max_model_len - prompt_tokens
        wanted = request.max_tokens
        if room <= 0 or (wanted is not None and wanted > room):
            raise RowError(
                ErrorCode.CONTEXT_LENGTH_EXCEEDED,
                f"This model's maximum context length is {self.max_model_len} tokens. "
                f"However, you requested {prompt_tokens + (wanted or 0)} tokens "
                f"({prompt_tokens} in the prompt, {wanted or 0} for the completion).",
            )
        return wanted or room

    def _describe(self, token_id: int, logprob: float) -> TopLogprob:
        text = self._tokenizer.decode([token_id])
        return TopLogprob(token=text, logprob=logprob, bytes=list(text.encode("utf-8")))

    def _logprobs(self, token_ids, logprobs, top_k: int) -> Optional[list[TokenLogprob]]:
        if logprobs is None:
            return None
        entries = []
        for token_id, alternatives in zip(token_ids, logprobs):
            ranked = sorted(alternatives.items(), key=lambda item: item[1].rank or 0)
            sampled = self._describe(token_id, alternatives[token_id].logprob)
            top = [self._describe(tid, lp.logprob) for tid, lp in ranked[:top_k]]
            entries.append(TokenLogprob(**sampled.model_dump(), top=top))
        return entries

    async def generate(self, request: EngineRequest) -> EngineResult:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import StructuredOutputsParams
        from vllm.v1.engine.exceptions import EngineDeadError

        prompt_ids = self._prompt_ids(request)
        sampling = dict(request.sampling)
        if request.structured_output:
            sampling["structured_outputs"] = StructuredOutputsParams(**request.structured_output)
        try:
            params = SamplingParams(max_tokens=self._max_tokens(request, len(prompt_ids)), **sampling)
        except (ValueError, TypeError) as exc:
            raise RowError(ErrorCode.INVALID_REQUEST, str(exc)) from None
        final = None
        try:
            async for output in self._llm.generate(
                TokensPrompt(prompt_token_ids=prompt_ids), params, f"{request.custom_id}-{uuid.uuid4().hex}"
            ):
                final = output
        except EngineDeadError as exc:  # the whole engine is gone: no row is to blame
            raise EngineFailure(f"vLLM engine died: {exc}") from exc
        except ValueError as exc:  # vLLM's per-request input checks
            raise RowError(ErrorCode.INVALID_REQUEST, str(exc)) from None
        except Exception as exc:  # EngineGenerateError and kin: this request alone failed
            raise RowError(ErrorCode.ENGINE_ERROR, f"{type(exc).__name__}: {exc}") from None
        choices = [
            Choice(
                text=completion.text,
                finish_reason=completion.finish_reason,
                completion_tokens=len(completion.token_ids),
                logprobs=self._logprobs(
                    completion.token_ids, completion.logprobs, request.sampling.get("logprobs") or 0
                ),
            )
            for completion in sorted(final.outputs, key=lambda c: c.index)
        ]
        return EngineResult(
            prompt_tokens=len(prompt_ids),
            cached_tokens=final.num_cached_tokens or 0,
            prompt_text=self._tokenizer.decode(prompt_ids) if request.echo else None,
            choices=choices,
        )

    def shutdown(self) -> None:
        self._llm.shutdown()


def build_engine(kind: str, model: str, engine_args: dict[str, Any], cpu_kv_cache_gib: int) -> Engine:
    if kind == "vllm":
        return VllmEngine(model, engine_args, cpu_kv_cache_gib)
    if kind == "scripted":
        from raybatch.pipeline.scripted_engine import ScriptedEngine

        return ScriptedEngine(engine_args)
    raise ValueError(f"unknown engine kind {kind!r}")


class EngineStage:
    """The `map_batches` callable class: rows with a `request` get a `result`; rows that
    already carry an error pass through untouched.

    A dead engine, or a request running past `request_timeout_seconds` (a hung engine),
    ends this actor's process: Ray Data restarts the actor with a fresh engine and
    retries its batches there, never again on the broken one. Nothing of those batches
    was committed, so nothing is lost or doubled. The rows in flight are recorded first
    (`engine_failures`), so that a row that fails every engine it meets is found and
    becomes an error row instead of restarting engines forever.
    """

    def __init__(
        self,
        kind: str,
        model: str,
        engine_args: dict[str, Any],
        cpu_kv_cache_gib: int,
        request_timeout_seconds: Optional[float] = None,
        output_url: Optional[str] = None,
        max_failures_per_row: int = 2,
    ):
        # Read before the engine starts: this actor may be the replacement of one that
        # failed, and the rows it had in flight are suspects here.
        self._failures = FailureLog(output_url) if output_url else None
        self._max_failures_per_row = max_failures_per_row
        self._gate = EngineGate()
        self._engine = build_engine(kind, model, engine_args, cpu_kv_cache_gib)
        self._timeout = request_timeout_seconds

    def _replace_engine(self, why: str) -> None:
        logger.error("replacing this engine actor: %s", why)
        if self._failures is not None:
            try:
                self._failures.record(why, list(self._gate.in_flight.values()))
            except Exception as error:  # the actor goes either way
                logger.error("could not record the engine failure: %s: %s", type(error).__name__, error)
        os._exit(1)  # the process must go: a dead or hung engine cannot be trusted again

    async def _answer(self, key: RowKey, request_json: Optional[str]) -> tuple:
        """(kind, result JSON, error code, error message) of one row."""
        if request_json is None:
            return None, None, None, None
        request = EngineRequest.model_validate_json(request_json)
        suspect = self._failures is not None and self._failures.is_suspect(key)
        if suspect:
            poisoned = poison_message(self._failures.failures_alone(key), self._max_failures_per_row)
            if poisoned:
                return request.kind, None, ErrorCode.ENGINE_ERROR.value, poisoned
        async with self._gate.enter(key, suspect):
            try:
                result = await asyncio.wait_for(self._engine.generate(request), self._timeout)
            except RowError as error:
                return request.kind, None, error.code, error.message
            except asyncio.TimeoutError:
                self._replace_engine(f"request {request.custom_id!r} ran over {self._timeout:g}s: engine hung")
            except EngineFailure as failure:
                self._replace_engine(str(failure))
        return request.kind, result.model_dump_json(), None, None

    async def __call__(self, batch: pa.Table) -> pa.Table:
        keys = zip(column(batch, "shard"), column(batch, "line"))
        answers = await asyncio.gather(*(self._answer(k, r) for k, r in zip(keys, column(batch, "request"))))
        codes = column(batch, "error_code")
        messages = column(batch, "error_message")
        return pa.Table.from_pydict(
            {
                "shard": column(batch, "shard"),
                "line": column(batch, "line"),
                "custom_id": column(batch, "custom_id"),
                "kind": [a[0] for a in answers],
                "result": [a[1] for a in answers],
                "error_code": [a[2] or c for a, c in zip(answers, codes)],
                "error_message": [a[3] or m for a, m in zip(answers, messages)],
            },
            schema=ENGINE_SCHEMA,
        )
