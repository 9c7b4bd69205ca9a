"""Embeddings on a vLLM pooling engine: `VllmEngine` hands embedding rows here.

Each item of a row's input is its own engine request, all in flight at once, so vLLM
batches them with every other row's; the row's answer keeps the items' order. If one
item fails, the rest are cancelled (vLLM aborts them) and the row is an error row.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

from raybatch.exceptions import EngineFailure, RowError
from raybatch.pipeline.embeddings import encode_embedding
from raybatch.pipeline.rows import EngineRequest, EngineResult
from raybatch.protocol import ErrorCode


def _token_ids(tokenizer: Any, item, max_model_len: int) -> list[int]:
    if isinstance(item, str):
        ids = tokenizer.encode(item)  # with the model's special tokens, as vLLM's server does
    else:
        vocab = len(tokenizer)
        if any(not 0 <= token < vocab for token in item):
            raise RowError(ErrorCode.INVALID_REQUEST, f"input token ids must be in [0, {vocab})")
        ids = list(item)
    if len(ids) > max_model_len:
        raise RowError(
            ErrorCode.CONTEXT_LENGTH_EXCEEDED,
            f"This model's maximum context length is {max_model_len} tokens. However, an "
            f"input of this request has {len(ids)} tokens.",
        )
    return ids


def pooling_params(request: EngineRequest, model_config: Any):
    """The row's PoolingParams, checked by vLLM's own rules (Matryoshka `dimensions`)."""
    from vllm import PoolingParams
    from vllm.exceptions import VLLMValidationError

    params = PoolingParams(task="embed", dimensions=request.dimensions)
    try:
        params.verify(model_config)
    except VLLMValidationError as exc:
        code = ErrorCode.DIMENSIONS_NOT_SUPPORTED if request.dimensions is not None else ErrorCode.INVALID_REQUEST
        raise RowError(code, str(exc)) from None
    return params


async def embed(llm: Any, tokenizer: Any, request: EngineRequest, max_model_len: int) -> EngineResult:
    """Answer one embeddings row on `llm` (an AsyncLLM started as a pooling model)."""
    from vllm.exceptions import VLLMValidationError
    from vllm.inputs import TokensPrompt
    from vllm.v1.engine.exceptions import EngineDeadError

    if request.adapter:  # LoRA is wired for generation only (engines/lora.py)
        raise RowError(ErrorCode.INVALID_REQUEST, f"LoRA adapter {request.adapter!r} cannot answer embeddings rows")
    prompts = [_token_ids(tokenizer, item, max_model_len) for item in request.inputs or []]
    params = pooling_params(request, llm.model_config)

    async def one(ids: list[int]):
        final = None
        async for output in llm.encode(
            TokensPrompt(prompt_token_ids=ids), params.clone(), f"{request.custom_id}-{uuid.uuid4().hex}"
        ):
            final = output
        return final.outputs.data.float().cpu().numpy()

    tasks = [asyncio.ensure_future(one(ids)) for ids in prompts]
    try:
        vectors = await asyncio.gather(*tasks)
    except BaseException as exc:
        for task in tasks:
            task.cancel()
        if isinstance(exc, EngineDeadError):  # the whole engine is gone: no row is to blame
            raise EngineFailure(f"vLLM engine died: {exc}") from exc
        if isinstance(exc, (ValueError, VLLMValidationError)):  # vLLM's per-request input checks
            raise RowError(ErrorCode.INVALID_REQUEST, str(exc)) from None
        if isinstance(exc, Exception):
            raise RowError(ErrorCode.ENGINE_ERROR, f"{type(exc).__name__}: {exc}") from None
        raise
    return EngineResult(
        prompt_tokens=sum(len(ids) for ids in prompts),
        cached_tokens=0,
        embeddings=[encode_embedding(vector, request.encoding_format or "float") for vector in vectors],
    )
