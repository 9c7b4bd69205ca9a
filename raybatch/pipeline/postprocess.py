"""Stage 5 — postprocess: engine results and error rows become output lines in the
OpenAI batch output envelope (the oracle is vLLM's `BatchRequestOutput`)."""

from __future__ import annotations

import time
import uuid
from typing import Any, Optional

import pyarrow as pa

from raybatch.pipeline.embeddings import EMBEDDING_KIND, build_embedding_body
from raybatch.pipeline.rows import EngineResult, TokenLogprob
from raybatch.pipeline.rows import OUTPUT_SCHEMA, column
from raybatch.protocol import (
    AssistantMessage,
    BatchError,
    BatchOutputLine,
    BatchResponse,
    ChatChoice,
    ChatCompletion,
    CompletionTokensDetails,
    OutputTokensDetails,
    TextChoice,
    TextCompletion,
    Usage,
)


def _chat_logprobs(entries: Optional[list[TokenLogprob]]) -> Optional[dict[str, Any]]:
    if entries is None:
        return None
    return {
        "content": [
            {
                "token": e.token,
                "logprob": e.logprob,
                "bytes": e.bytes,
                "top_logprobs": [t.model_dump() for t in e.top],
            }
            for e in entries
        ]
    }


def _text_logprobs(entries: Optional[list[TokenLogprob]], offset: int) -> Optional[dict[str, Any]]:
    if entries is None:
        return None
    offsets = []
    for e in entries:
        offsets.append(offset)
        offset += len(e.token)
    return {
        "tokens": [e.token for e in entries],
        "token_logprobs": [e.logprob for e in entries],
        "top_logprobs": [{t.token: t.logprob for t in e.top} for e in entries],
        "text_offset": offsets,
    }


def _reasoning_details(result: EngineResult) -> Optional[OutputTokensDetails]:
    """Set for a model served with a reasoning parser (its choices count reasoning
    tokens), as vLLM's server does; absent otherwise."""
    counts = [c.reasoning_tokens for c in result.choices if c.reasoning_tokens is not None]
    return OutputTokensDetails(reasoning_tokens=sum(counts)) if counts else None


def build_response_body(result: EngineResult, *, chat: bool, model: str, created: int):
    completion_tokens = sum(c.completion_tokens for c in result.choices)
    usage = Usage(
        prompt_tokens=result.prompt_tokens,
        completion_tokens=completion_tokens,
        total_tokens=result.prompt_tokens + completion_tokens,
        prompt_tokens_details=CompletionTokensDetails(cached_tokens=result.cached_tokens),
        completion_tokens_details=_reasoning_details(result),
    )
    if chat:
        return ChatCompletion(
            id=f"chatcmpl-{uuid.uuid4().hex}",
            created=created,
            model=model,
            choices=[
                ChatChoice(
                    index=i,
                    message=AssistantMessage(
                        content=c.text, reasoning_content=c.reasoning_content, tool_calls=c.tool_calls
                    ),
                    logprobs=_chat_logprobs(c.logprobs),
                    finish_reason=c.finish_reason,
                )
                for i, c in enumerate(result.choices)
            ],
            usage=usage,
        )
    prefix = result.prompt_text or ""
    return TextCompletion(
        id=f"cmpl-{uuid.uuid4().hex}",
        created=created,
        model=model,
        choices=[
            TextChoice(
                index=i,
                text=prefix + (c.text or ""),
                logprobs=_text_logprobs(c.logprobs, len(prefix)),
                finish_reason=c.finish_reason,
            )
            for i, c in enumerate(result.choices)
        ],
        usage=usage,
    )


def finish_rows(batch: pa.Table, *, model: str) -> pa.Table:
    """Ray Data UDF: engine rows in, output lines (and their token counts) out."""
    created = int(time.time())
    out: dict[str, list] = {name: [] for name in OUTPUT_SCHEMA.names}
    rows = zip(
        column(batch, "shard"),
        column(batch, "line"),
        column(batch, "custom_id"),
        column(batch, "result"),
        column(batch, "error_code"),
        column(batch, "error_message"),
        column(batch, "kind"),
    )
    for shard, line, custom_id, result_json, code, message, kind in rows:
        tokens = (0, 0, 0)
        if code is not None:
            envelope = BatchOutputLine(
                id=f"batch_req_{uuid.uuid4().hex}",
                custom_id=custom_id,
                response=None,
                error=BatchError(code=code, message=message, line=line, file=shard),
            )
        else:
            result = EngineResult.model_validate_json(result_json)
            if kind == EMBEDDING_KIND:
                body = build_embedding_body(result, model=model)
            else:
                # An adapter's row names its adapter, as OpenAI and vLLM name a fine-tune.
                body = build_response_body(result, chat=kind == "chat", model=result.adapter or model, created=created)
            envelope = BatchOutputLine(
                id=f"batch_req_{uuid.uuid4().hex}",
                custom_id=custom_id,
                response=BatchResponse(
                    status_code=200, request_id=f"req_{uuid.uuid4().hex}", body=body
                ),
                error=None,
            )
            # An embedding's usage has no completion or cached tokens (OpenAI's has none
            # either): jobProgress counts what the output lines show.
            completion_tokens = getattr(body.usage, "completion_tokens", 0)
            cached = 0 if kind == EMBEDDING_KIND else result.cached_tokens
            tokens = (body.usage.prompt_tokens, completion_tokens, cached)
        values = (shard, line, code is not None, envelope.model_dump_json(), *tokens)
        for name, value in zip(OUTPUT_SCHEMA.names, values):
            out[name].append(value)
    return pa.Table.from_pydict(out, schema=OUTPUT_SCHEMA)
