"""Stage 3 — preprocess: a validated request becomes an `EngineRequest`.

The engine request is what any engine behind `raybatch.engines.Engine` needs:
the chat messages or the prompt, and sampling settings named as vLLM's
`SamplingParams` names them. It travels between stages as JSON, so blocks stay plain
string columns whatever the rows hold.
"""

from __future__ import annotations

from typing import Any, Optional

import pyarrow as pa
from pydantic_core import to_json

from raybatch.adapters import AdapterRouting, route_row
from raybatch.exceptions import RowError
from raybatch.pipeline.images import ImageLimits, count_images, resolve_all
from raybatch.pipeline.embeddings import to_embedding_request
from raybatch.pipeline.prompts import PromptRendering, ready_renderer
from raybatch.pipeline.rows import REQUEST_SCHEMA, EngineRequest, column
from raybatch.pipeline.validate import Body, ValidatedRequest, is_blank, validate_line
from raybatch.protocol import DEFAULT_MAX_CUSTOM_ID_BYTES, DEFAULT_MAX_OUTPUT_TOKENS, ChatCompletionBody, EmbeddingBody


def _sampling(body: Body) -> dict[str, Any]:
    sampling: dict[str, Any] = {
        "n": body.n,
        "temperature": body.temperature,
        "top_p": body.top_p,
        "top_k": body.top_k,
        "min_tokens": body.min_tokens,
        "stop": [body.stop] if isinstance(body.stop, str) else body.stop,
        "seed": body.seed,
        "presence_penalty": body.presence_penalty,
        "frequency_penalty": body.frequency_penalty,
        "repetition_penalty": body.repetition_penalty,
        "ignore_eos": body.ignore_eos,
    }
    if isinstance(body, ChatCompletionBody):
        # OpenAI chat: `logprobs` switches them on, `top_logprobs` says how many
        # alternatives; vLLM's number 0 means "the sampled token only".
        sampling["logprobs"] = (body.top_logprobs or 0) if body.logprobs else None
    else:
        sampling["logprobs"] = body.logprobs
    return {k: v for k, v in sampling.items() if v is not None}


def _structured_output(body: Body) -> Optional[dict[str, Any]]:
    response_format = body.response_format
    if response_format is None or response_format.type == "text":
        return None
    # Whitespace is disallowed between JSON tokens: models that loop on whitespace
    # would otherwise fill max_tokens with it and never close the object.
    if response_format.type == "json_object":
        return {"json_object": True, "disable_any_whitespace": True}
    return {"json": response_format.json_schema.schema_, "disable_any_whitespace": True}


def _tool_fields(body: ChatCompletionBody) -> dict[str, Any]:
    if not body.tools:
        return {}
    choice = body.tool_choice
    return {
        "tools": [tool.model_dump(exclude_none=True) for tool in body.tools],
        "tool_choice": choice.model_dump() if hasattr(choice, "model_dump") else choice,
        "parallel_tool_calls": body.parallel_tool_calls,
    }


def engine_request_fields(
    request: ValidatedRequest,
    max_output_tokens: Optional[int] = None,
    messages: Optional[list[dict[str, Any]]] = None,
) -> dict[str, Any]:
    """The EngineRequest's fields, in its order, those that are None left out: what
    `EngineRequest(**fields).model_dump(exclude_none=True)` holds, without building the
    model for every row (its fields come from a body validated already).
    `max_output_tokens`: the job's bound, the most a row that sets no max_tokens gets.
    `messages`: a row's messages with its images resolved (`images.resolve_all`)."""
    body = request.body
    if isinstance(body, EmbeddingBody):
        return to_embedding_request(request.custom_id, body).model_dump(exclude_none=True)
    chat = isinstance(body, ChatCompletionBody)
    if messages is None and chat:
        messages = [m.template_fields() for m in body.messages]
    output_limit = body.output_limit
    fields = {
        "custom_id": request.custom_id,
        "kind": "chat" if chat else "completion",
        "messages": messages if chat else None,
        "images": count_images(body) or None,
        "prompt": None if chat else body.prompt,
        "sampling": _sampling(body),
        "max_tokens": output_limit,
        "max_tokens_cap": None if output_limit else max_output_tokens,
        "structured_output": _structured_output(body),
        "echo": not chat and bool(body.echo),
        **(_tool_fields(body) if chat else {}),
    }
    return {name: value for name, value in fields.items() if value is not None}


def to_engine_request(
    request: ValidatedRequest,
    max_output_tokens: Optional[int] = None,
    messages: Optional[list[dict[str, Any]]] = None,
) -> EngineRequest:
    """`engine_request_fields` as the model."""
    return EngineRequest(**engine_request_fields(request, max_output_tokens, messages))


def with_adapter(fields: dict[str, Any], routing: AdapterRouting, model: Optional[str]) -> dict[str, Any]:
    """An engine request's `fields` routed to the adapter its row's `body.model` names
    (or the job's own). Raises RowError(model_not_found) for a name the job does not serve."""
    try:
        adapter = route_row(routing, model)
    except RowError as error:
        error.custom_id = fields["custom_id"]
        raise
    if adapter is None:
        return fields
    routed = {**fields, "adapter": adapter, "adapter_path": routing.adapters[adapter]}
    return {name: routed[name] for name in EngineRequest.model_fields if name in routed}  # the model's order


def prepare_requests(
    batch: pa.Table,
    *,
    max_line_bytes: int,
    max_n: int,
    job_defaults: dict[str, Any],
    duplicates: frozenset[tuple[str, int]],
    max_custom_id_bytes: int = DEFAULT_MAX_CUSTOM_ID_BYTES,
    lora: Optional[dict[str, Any]] = None,
    images: Optional[ImageLimits] = None,
    task: str = "generate",
    prompts: Optional[dict[str, Any]] = None,
    **bounds: int,
) -> pa.Table:
    """Ray Data UDF for stages 2 and 3: raw lines in, engine requests or errors out.
    `bounds`: the job's limits on expensive rows other than max_n (`check_row_bounds`);
    `lora`: the job's AdapterRouting (as a dict), when its model has LoRA adapters;
    `images`: the job's bounds on images in chat rows; `prompts`: the job's
    PromptRendering (as a dict), when its prompts are rendered here (pipeline/prompts.py).

    Blank lines are dropped here (the input scan counts them)."""
    out: dict[str, list] = {name: [] for name in REQUEST_SCHEMA.names}
    routing = AdapterRouting.model_validate(lora) if lora is not None else None
    renderer = ready_renderer(PromptRendering(**prompts)) if prompts is not None else None
    rows = []  # (shard, line, custom_id, ValidatedRequest or RowError)
    for shard, line, raw in zip(column(batch, "shard"), column(batch, "line"), column(batch, "raw")):
        if is_blank(raw):
            continue
        try:
            validated = validate_line(
                raw,
                max_line_bytes=max_line_bytes,
                max_n=max_n,
                job_defaults=job_defaults,
                is_duplicate=(shard, line) in duplicates,
                max_custom_id_bytes=max_custom_id_bytes,
                task=task,
                **bounds,
            )
            rows.append((shard, line, validated.custom_id, validated))
        except RowError as error:
            rows.append((shard, line, error.custom_id, error))
    # Every image of the batch is fetched and checked at once (pipeline/images.py).
    resolved = resolve_all(
        [row[3].body if isinstance(row[3], ValidatedRequest) else None for row in rows], images or ImageLimits()
    )
    cap = bounds.get("max_output_tokens", DEFAULT_MAX_OUTPUT_TOKENS)
    for (shard, line, custom_id, outcome), messages in zip(rows, resolved):
        if isinstance(messages, RowError):
            outcome = messages
        request_json = code = message = None
        if isinstance(outcome, RowError):
            code, message = outcome.code, outcome.message
        else:
            try:
                fields = engine_request_fields(outcome, cap, messages)
                if routing is not None:
                    fields = with_adapter(fields, routing, outcome.body.model)
                if renderer is not None:
                    fields = renderer.render(fields)
                # As EngineRequest(**fields).model_dump_json(exclude_none=True) writes it
                # (tests/unit/test_output_lines.py); the replica validates it as the model.
                request_json = to_json(fields).decode()
            except RowError as error:
                code, message = error.code, error.message
        for name, value in zip(
            REQUEST_SCHEMA.names, (shard, line, custom_id, request_json, code, message)
        ):
            out[name].append(value)
    return pa.Table.from_pydict(out, schema=REQUEST_SCHEMA)
