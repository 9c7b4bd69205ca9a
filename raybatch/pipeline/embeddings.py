"""Embeddings: `/v1/embeddings` rows, from the validated body to OpenAI's response.

An embedding model is a catalog entry (or `raybatch run` config) whose `engine.task` is
"embed": its replicas run vLLM as a pooling model and answer embeddings rows only, and
a generation model answers chat and completion rows only. Which rows a job's model
cannot answer is known from the job's config alone, so such a row is refused here,
before it takes a place at the engine pool.

The engine embeds each item of a row's `input` on its own (vLLM batches them with every
other request in flight) and returns each vector already in the row's encoding: floats,
or base64 of little-endian float32 as OpenAI sends it, which is 4 bytes a dimension
instead of ~20 characters of JSON on the way back through the pool.
"""

from __future__ import annotations

import base64
from typing import Sequence, Union

import numpy as np

from raybatch.exceptions import RowError
from raybatch.pipeline.rows import EngineRequest, EngineResult
from raybatch.protocol import (
    EMBEDDINGS_URL,
    Embedding,
    EmbeddingBody,
    EmbeddingResponse,
    EmbeddingUsage,
    ErrorCode,
)

EMBEDDING_KIND = "embedding"  # EngineRequest.kind and the engine stage's `kind` column


def check_url_for_task(url: str, task: str) -> None:
    """Refuse a row its job's model cannot answer (`task`: EngineConfig.task)."""
    if task == "embed" and url != EMBEDDINGS_URL:
        raise RowError(
            ErrorCode.UNSUPPORTED_URL_FOR_MODEL,
            f"this job's model is an embedding model: it answers {EMBEDDINGS_URL} rows only, not {url}",
        )
    if task != "embed" and url == EMBEDDINGS_URL:
        raise RowError(
            ErrorCode.UNSUPPORTED_URL_FOR_MODEL,
            f"this job's model is a generation model: {EMBEDDINGS_URL} rows need an embedding "
            f"model (a catalog entry whose engine.task is \"embed\")",
        )


def to_embedding_request(custom_id: str, body: EmbeddingBody) -> EngineRequest:
    return EngineRequest(
        custom_id=custom_id,
        kind=EMBEDDING_KIND,
        inputs=body.inputs(),
        sampling={},
        dimensions=body.dimensions,
        encoding_format=body.encoding_format,
    )


def encode_embedding(vector: Sequence[float], encoding_format: str) -> Union[list[float], str]:
    """One vector in the row's encoding. Float32 either way: the floats are the float32
    values (exact in JSON), and base64 decodes to the very same list."""
    values = np.asarray(vector, dtype=np.float32)
    if encoding_format == "base64":
        return base64.b64encode(values.astype("<f4").tobytes()).decode("ascii")
    return values.tolist()


def build_embedding_body(result: EngineResult, *, model: str) -> EmbeddingResponse:
    return EmbeddingResponse(
        data=[Embedding(index=i, embedding=vector) for i, vector in enumerate(result.embeddings or [])],
        model=model,
        usage=EmbeddingUsage(prompt_tokens=result.prompt_tokens, total_tokens=result.prompt_tokens),
    )
