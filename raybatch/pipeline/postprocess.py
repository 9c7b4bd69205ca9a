"""Stage 5 — postprocess: engine results and error rows become output lines in the
OpenAI batch output envelope (the oracle is vLLM's `BatchRequestOutput`).

The protocol's pydantic models (BatchOutputLine and the bodies, `build_response_body`)
define a line; `finish_rows` writes it from plain dicts with the models' serializer,
which is several times cheaper a row than building the models, and byte for byte the
same (tests/unit/test_output_lines.py)."""

from __future__ import annotations

import json
import os
import time
import uuid
from typing import Any, Optional

import pyarrow as pa
from pydantic_core import to_json

from raybatch.pipeline.embeddings import EMBEDDING_KIND, build_embedding_body
from raybatch.pipeline.rows import EngineResult, TokenLogprob
from raybatch.pipeline.rows import OUTPUT_SCHEMA, column
from raybatch.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatCompletion,
    CompletionTokensDetails,
    ErrorCode,
    OutputTokensDetails,
    TextChoice,
    TextCompletion,
    ToolCall,
    Usage,
)


def _chat_logprobs(entries: Optional[list[dict[str, Any]]]) -> Optional[dict[str, Any]]:
    """`entries`: a choice's TokenLogprobs as dicts (its JSON, parsed)."""
    if entries is None:
        return None
    return {
        "content": [
            {
                "token": e["token"],
                "logprob": e["logprob"],
                "bytes": e["bytes"],
                "top_logprobs": [{"token": t["token"], "logprob": t["logprob"], "bytes": t["bytes"]} for t in e["top"]],
            }
            for e in entries
        ]
    }


def _text_logprobs(entries: Optional[list[dict[str, Any]]], offset: int) -> Optional[dict[str, Any]]:
    if entries is None:
        return None
    offsets = []
    for e in entries:
        offsets.append(offset)
        offset += len(e["token"])
    return {
        "tokens": [e["token"] for e in entries],
        "token_logprobs": [e["logprob"] for e in entries],
        "top_logprobs": [{t["token"]: t["logprob"] for t in e["top"]} for e in entries],
        "text_offset": offsets,
    }


def _dumped(entries: Optional[list[TokenLogprob]]) -> Optional[list[dict[str, Any]]]:
    return None if entries is None else [e.model_dump() for e in entries]


def _reasoning_details(result: EngineResult) -> Optional[OutputTokensDetails]:
    """Set for a model served with a reasoning parser (its choices count reasoning
    tokens), as vLLM's server does; absent otherwise."""
    counts = [c.reasoning_tokens for c in result.choices if c.reasoning_tokens is not None]
    return OutputTokensDetails(reasoning_tokens=sum(counts)) if counts else None


def build_response_body(result: EngineResult, *, chat: bool, model: str, created: int):
    """The response body as the protocol's models: what `response_body_fields` writes."""
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
                    logprobs=_chat_logprobs(_dumped(c.logprobs)),
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
                logprobs=_text_logprobs(_dumped(c.logprobs), len(prefix)),
                finish_reason=c.finish_reason,
            )
            for i, c in enumerate(result.choices)
        ],
        usage=usage,
    )


def _random_ids(count: int) -> list[str]:
    """`count` random 32-hex-digit ids (uuid4().hex's format) from one urandom read:
    uuid4 costs ~10 µs each, and a row needs three."""
    hexes = os.urandom(16 * count).hex()
    return [hexes[i : i + 32] for i in range(0, 32 * count, 32)]


def _message_fields(choice: dict[str, Any]) -> dict[str, Any]:
    """AssistantMessage's dump: reasoning_content and tool_calls only when set."""
    message: dict[str, Any] = {"role": "assistant", "content": choice["text"]}
    if choice.get("reasoning_content") is not None:
        message["reasoning_content"] = choice["reasoning_content"]
    if choice.get("tool_calls"):
        # Rare: through the model, which checks each call and fills in its defaults.
        message["tool_calls"] = [ToolCall.model_validate(call).model_dump() for call in choice["tool_calls"]]
    return message


def response_body_fields(result: dict[str, Any], *, chat: bool, model: str, created: int, body_id: str) -> dict:
    """`build_response_body(...).model_dump()` built as plain dicts, keys in the models'
    order, from an EngineResult's JSON already parsed: the same line once serialized
    (tests/unit/test_output_lines.py holds it to the models), for a fraction of the CPU
    of four models a row. `body_id`: 32 random hex digits."""
    choices = result.get("choices") or []
    completion_tokens = sum(c["completion_tokens"] for c in choices)
    prompt_tokens = result["prompt_tokens"]
    usage: dict[str, Any] = {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": result["cached_tokens"]},
    }
    reasoning = [c["reasoning_tokens"] for c in choices if c.get("reasoning_tokens") is not None]
    if reasoning:
        usage["completion_tokens_details"] = {"reasoning_tokens": sum(reasoning)}
    if chat:
        return {
            "id": f"chatcmpl-{body_id}",
            "object": "chat.completion",
            "created": created,
            "model": model,
            "choices": [
                {
                    "index": i,
                    "message": _message_fields(c),
                    "logprobs": _chat_logprobs(c.get("logprobs")),
                    "finish_reason": c["finish_reason"],
                }
                for i, c in enumerate(choices)
            ],
            "usage": usage,
        }
    prefix = result.get("prompt_text") or ""
    return {
        "id": f"cmpl-{body_id}",
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": [
            {
                "index": i,
                "text": prefix + (c["text"] or ""),
                "logprobs": _text_logprobs(c.get("logprobs"), len(prefix)),
                "finish_reason": c["finish_reason"],
            }
            for i, c in enumerate(choices)
        ],
        "usage": usage,
    }


def output_line(
    *,
    line_id: str,
    custom_id: Optional[str],
    error: Optional[tuple[str, str, int, str]] = None,
    request_id: Optional[str] = None,
    body: Any = None,
) -> str:
    """One output line, as `BatchOutputLine(...).model_dump_json()` writes it: `error`
    (code, message, line, file) for an error row, else `request_id` and `body` (dicts,
    or models, which serialize as themselves). pydantic_core writes it, so numbers and
    strings come out exactly as the models' dump writes them (e.g. 1e-05 as 0.00001, an
    infinite logprob as null)."""
    if error is not None:
        code, message, line, file = error
        fields = {
            "id": f"batch_req_{line_id}",
            "custom_id": custom_id,
            "response": None,
            "error": {"code": ErrorCode(code).value, "message": message, "line": line, "file": file},
        }
    else:
        fields = {
            "id": f"batch_req_{line_id}",
            "custom_id": custom_id,
            "response": {"status_code": 200, "request_id": f"req_{request_id}", "body": body},
            "error": None,
        }
    return to_json(fields, inf_nan_mode="null").decode()


def finish_rows(batch: pa.Table, *, model: str) -> pa.Table:
    """Ray Data UDF: engine rows in, output lines (and their token counts) out. Each
    line is written from plain dicts (`output_line`); the protocol's models define it."""
    created = int(time.time())
    out: dict[str, list] = {name: [] for name in OUTPUT_SCHEMA.names}
    ids = iter(_random_ids(3 * batch.num_rows))
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
            output = output_line(line_id=next(ids), custom_id=custom_id, error=(code, message, line, shard))
        elif kind == EMBEDDING_KIND:
            result = EngineResult.model_validate_json(result_json)
            body = build_embedding_body(result, model=model)
            output = output_line(line_id=next(ids), custom_id=custom_id, request_id=next(ids), body=body)
            # An embedding's usage has no completion or cached tokens (OpenAI's has none
            # either): jobProgress counts what the output lines show.
            tokens = (body.usage.prompt_tokens, 0, 0)
        else:
            result = json.loads(result_json)
            # An adapter's row names its adapter, as OpenAI and vLLM name a fine-tune.
            body = response_body_fields(
                result, chat=kind == "chat", model=result.get("adapter") or model, created=created, body_id=next(ids)
            )
            output = output_line(line_id=next(ids), custom_id=custom_id, request_id=next(ids), body=body)
            usage = body["usage"]
            tokens = (usage["prompt_tokens"], usage["completion_tokens"], result["cached_tokens"])
        for name, value in zip(OUTPUT_SCHEMA.names, (shard, line, code is not None, output, *tokens)):
            out[name].append(value)
    return pa.Table.from_pydict(out, schema=OUTPUT_SCHEMA)
