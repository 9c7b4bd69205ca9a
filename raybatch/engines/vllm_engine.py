"""The engines behind the pool's replicas: the `Engine` interface, vLLM's async engine
(`VllmEngine`), and `build_engine`, which picks one by kind ('vllm' or 'scripted', the
deterministic test engine of `engines/scripted.py`).
"""

from __future__ import annotations

import os
import uuid
from typing import Any, Optional, Protocol

from raybatch.engines.chat_frontend import FRONTEND_ARGS, ChatFrontend, PreparedChat
from raybatch.engines.lora import AdapterRequests
from raybatch.engines.vision import render_with_images
from raybatch.engines.vllm_embed import embed
from raybatch.exceptions import EngineFailure, RowError
from raybatch.pipeline.embeddings import EMBEDDING_KIND
from raybatch.pipeline.rows import Choice, EngineRequest, EngineResult, TokenLogprob, TopLogprob
from raybatch.protocol import ErrorCode


class Engine(Protocol):
    async def generate(self, request: EngineRequest) -> EngineResult:
        """Answer one request. Raises RowError for a request this engine cannot answer;
        any other exception means the engine itself is in trouble."""


class VllmEngine:
    """vLLM's async engine (v1 `AsyncLLM`): continuous batching over every request in
    flight, prefix caching on, the model's own chat template."""

    _pooling = False  # set at start: a pooling model (EngineConfig.task "embed")

    def __init__(self, model: str, engine_args: dict[str, Any], cpu_kv_cache_gib: int):
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(cpu_kv_cache_gib))
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        args = dict(engine_args)
        # vllm serve's front-end flags ride in engine_args too; the engine must not see them.
        frontend = {name: args.pop(name, None) for name in FRONTEND_ARGS}
        if args.get("tensor_parallel_size", 1) > 1 and args.get("pipeline_parallel_size", 1) == 1:
            # One node: the actor holds all of the replica's GPUs; workers are its own
            # processes. Pipeline parallel spans nodes: the plan asks for vLLM's Ray
            # executor inside the replica's placement group instead.
            args.setdefault("distributed_executor_backend", "mp")
        self._llm = AsyncLLM.from_engine_args(AsyncEngineArgs(model=model, **args))
        self._tokenizer = self._llm.tokenizer
        self.max_model_len = self._llm.model_config.max_model_len
        self._adapters = AdapterRequests(self._llm.vllm_config.lora_config)
        self._chat = ChatFrontend(
            self._tokenizer,
            self._llm.model_config,
            reasoning_parser=args.get("reasoning_parser"),
            **frontend,
        )
        self._pooling = self._llm.model_config.runner_type == "pooling"

    def _prompt_ids(self, request: EngineRequest) -> list[int]:
        if request.prompt_token_ids is not None:  # tokenized in the pipeline (pipeline/prompts.py)
            return request.prompt_token_ids
        tokenizer = self._tokenizer
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
        # A row that set no max_tokens gets what the context leaves, within the job's bound.
        return wanted or min(room, request.max_tokens_cap or room)

    def _describe(self, token_id: int, logprob) -> TopLogprob:
        # vLLM's detokenizer already decoded every returned token (`decoded_token`):
        # decoding again here would cost a tokenizer call per token on the engine's loop.
        text = logprob.decoded_token
        if text is None:
            text = self._tokenizer.decode([token_id])
        return TopLogprob(token=text, logprob=logprob.logprob, bytes=list(text.encode("utf-8")))

    def _logprobs(self, token_ids, logprobs, top_k: int) -> Optional[list[TokenLogprob]]:
        if logprobs is None:
            return None
        entries = []
        for token_id, alternatives in zip(token_ids, logprobs):
            ranked = sorted(alternatives.items(), key=lambda item: item[1].rank or 0)
            sampled = self._describe(token_id, alternatives[token_id])
            top = [self._describe(tid, lp) for tid, lp in ranked[:top_k]]
            entries.append(TokenLogprob(**sampled.model_dump(), top=top))
        return entries

    async def generate(self, request: EngineRequest) -> EngineResult:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams
        from vllm.v1.engine.exceptions import EngineDeadError

        if self._pooling != (request.kind == EMBEDDING_KIND):
            # The validate stage refuses these by the job's task; this catches a pooling
            # model started by engine_args alone, without task "embed".
            kind = "an embedding" if self._pooling else "a generation"
            raise RowError(ErrorCode.UNSUPPORTED_URL_FOR_MODEL, f"this job's model is {kind} model; "
                           f"it cannot answer a {request.kind} row")
        if self._pooling:
            return await embed(self._llm, self._tokenizer, request, self.max_model_len)
        chat: Optional[PreparedChat] = None
        sampling = dict(request.sampling)
        if request.images:  # vLLM's own chat path: the model's processor places the images
            if request.tools:
                raise RowError(ErrorCode.INVALID_REQUEST, "tools in a row with images are not supported")
            prompt, prompt_tokens = await render_with_images(self._llm, request)
            if request.structured_output:
                sampling["structured_outputs"] = StructuredOutputsParams(**request.structured_output)
        else:
            if request.kind == "chat":
                chat = self._chat.prepare(request)
                prompt_ids = chat.prompt_ids
                sampling["structured_outputs"] = chat.structured_outputs
                if not chat.skip_special_tokens:  # a tool parser whose markup is special tokens
                    sampling["skip_special_tokens"] = False
            else:
                prompt_ids = self._prompt_ids(request)
                if request.structured_output:
                    sampling["structured_outputs"] = StructuredOutputsParams(**request.structured_output)
            prompt, prompt_tokens = TokensPrompt(prompt_token_ids=prompt_ids), len(prompt_ids)
        try:
            # FINAL_ONLY: a batch row needs its whole answer only. vLLM's default for
            # AsyncLLM (CUMULATIVE) builds each request's output again at every step and
            # wakes its coroutine: with 256 rows decoding, 256 outputs per step in the
            # replica's process, beside the engine on the same cores (`LLM.chat` asks
            # for final outputs only too).
            params = SamplingParams(max_tokens=self._max_tokens(request, prompt_tokens),
                                    output_kind=RequestOutputKind.FINAL_ONLY, **sampling)
        except (ValueError, TypeError) as exc:
            raise RowError(ErrorCode.INVALID_REQUEST, str(exc)) from None
        lora_request = self._adapters.request(request) if request.adapter else None
        final = None
        try:
            async for output in self._llm.generate(
                prompt,
                params,
                f"{request.custom_id}-{uuid.uuid4().hex}",
                lora_request=lora_request,
                **(chat.engine_kwargs if chat else {}),
            ):
                final = output
        except EngineDeadError as exc:  # the whole engine is gone: no row is to blame
            raise EngineFailure(f"vLLM engine died: {exc}") from exc
        except ValueError as exc:  # vLLM's per-request input checks
            raise RowError(ErrorCode.INVALID_REQUEST, str(exc)) from None
        except Exception as exc:  # EngineGenerateError and kin: this request alone failed
            raise RowError(ErrorCode.ENGINE_ERROR, f"{type(exc).__name__}: {exc}") from None
        choices = []
        for completion in sorted(final.outputs, key=lambda c: c.index):
            choice = Choice(
                text=completion.text,
                finish_reason=completion.finish_reason,
                completion_tokens=len(completion.token_ids),
                logprobs=self._logprobs(
                    completion.token_ids, completion.logprobs, request.sampling.get("logprobs") or 0
                ),
            )
            if chat is not None:
                parsed = self._chat.finish(chat, completion.text, completion.token_ids, completion.finish_reason)
                choice.text, choice.finish_reason = parsed.content, parsed.finish_reason
                choice.reasoning_content, choice.reasoning_tokens = parsed.reasoning_content, parsed.reasoning_tokens
                choice.tool_calls = parsed.tool_calls
            choices.append(choice)
        return EngineResult(
            prompt_tokens=prompt_tokens,
            cached_tokens=final.num_cached_tokens or 0,
            prompt_text=self._tokenizer.decode(prompt["prompt_token_ids"]) if request.echo else None,
            choices=choices,
            adapter=request.adapter,
        )

    def shutdown(self) -> None:
        self._llm.shutdown()


def build_engine(kind: str, model: str, engine_args: dict[str, Any], cpu_kv_cache_gib: int) -> Engine:
    if kind == "vllm":
        return VllmEngine(model, engine_args, cpu_kv_cache_gib)
    if kind == "scripted":
        from raybatch.engines.scripted import ScriptedEngine

        return ScriptedEngine(engine_args)
    raise ValueError(f"unknown engine kind {kind!r}")
