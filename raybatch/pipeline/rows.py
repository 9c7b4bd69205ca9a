"""What travels between stages: the columns rows carry, fixed as Arrow schemas, and
the engine request and result that travel inside them as JSON.

Every stage returns a table of its schema, so a batch in which some column happens to
be all null still has the same types as the others, and blocks always concatenate.
"""

from __future__ import annotations

import json
from typing import Any, Optional, Union

import pyarrow as pa
from pydantic import BaseModel, ConfigDict

# read → validate/preprocess
RAW_SCHEMA = pa.schema([("shard", pa.string()), ("line", pa.int64()), ("raw", pa.binary())])

# read → input scan (custom_id digests for duplicate detection, blank-line counts). A
# fixed-size digest, not the custom_id: what the driver gathers for a whole input must
# not grow with the length of the ids a user chose.
CUSTOM_ID_DIGEST_BYTES = 16
SCAN_SCHEMA = pa.schema(
    [
        ("shard", pa.string()),
        ("line", pa.int64()),
        ("custom_id_digest", pa.binary(CUSTOM_ID_DIGEST_BYTES)),
        ("blank", pa.bool_()),
        # True: the id was read off the line's start without parsing the line
        # (validate.leading_custom_id), so it is a claim only if the line is valid JSON;
        # DuplicateScan checks that where it matters. Null counts as False.
        ("unparsed", pa.bool_()),
    ]
)

# preprocess → engine: a row has a `request` (JSON EngineRequest) or an error.
REQUEST_SCHEMA = pa.schema(
    [
        ("shard", pa.string()),
        ("line", pa.int64()),
        ("custom_id", pa.string()),
        ("request", pa.string()),
        ("error_code", pa.string()),
        ("error_message", pa.string()),
    ]
)

# engine → postprocess: `result` (JSON EngineResult) replaces `request`.
ENGINE_SCHEMA = pa.schema(
    [
        ("shard", pa.string()),
        ("line", pa.int64()),
        ("custom_id", pa.string()),
        ("kind", pa.string()),  # "chat" | "completion" | "embedding"; null on error rows
        ("result", pa.string()),
        ("error_code", pa.string()),
        ("error_message", pa.string()),
    ]
)

# postprocess → writer: one finished output line each.
OUTPUT_SCHEMA = pa.schema(
    [
        ("shard", pa.string()),
        ("line", pa.int64()),
        ("is_error", pa.bool_()),
        ("output", pa.string()),
        ("prompt_tokens", pa.int64()),
        ("completion_tokens", pa.int64()),
        ("cached_tokens", pa.int64()),
    ]
)


def column(batch: Any, name: str) -> list:
    """A column of a pyarrow table or a dict batch as a Python list."""
    values = batch[name]
    return values.to_pylist() if hasattr(values, "to_pylist") else list(values)


# The JSON inside the `request` column: what any engine needs.
class EngineRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    custom_id: str
    kind: str  # "chat" | "completion" | "embedding"
    # Text content is a string; a message with images keeps OpenAI's list of parts, every
    # image a data: URL checked by preprocess (pipeline/images.py).
    messages: Optional[list[dict[str, Any]]] = None  # role, content; tool_calls, tool_call_id, name when given
    images: Optional[int] = None  # image parts in `messages`: such a row is rendered by vLLM's chat path
    prompt: Optional[Union[str, list[int]]] = None
    # The prompt as the preprocess stage rendered and tokenized it (pipeline/prompts.py):
    # a chat row's messages through the chat template, a completion's text. None: the
    # replica renders it.
    prompt_token_ids: Optional[list[int]] = None
    sampling: dict[str, Any]
    max_tokens: Optional[int] = None  # None: whatever the context leaves, up to the cap
    max_tokens_cap: Optional[int] = None  # the job's bound, for a row that set no max_tokens
    structured_output: Optional[dict[str, Any]] = None
    echo: bool = False
    # The LoRA adapter that answers this row (raybatch/adapters.py); None: the base model.
    adapter: Optional[str] = None
    adapter_path: Optional[str] = None
    # Chat rows with tools: as the body gave them (engines/chat_frontend.py reads them).
    tools: Optional[list[dict[str, Any]]] = None
    tool_choice: Optional[Union[str, dict[str, Any]]] = None
    parallel_tool_calls: Optional[bool] = None
    # Embeddings (pipeline/embeddings.py): the items to embed, each on its own.
    inputs: Optional[list[Union[str, list[int]]]] = None
    dimensions: Optional[int] = None
    encoding_format: Optional[str] = None  # "float" | "base64"


# How much of a prompt's start names its prefix: about 128 tokens, the CPU engine's
# KV-cache block (a shorter shared start is never cached) and several GPU blocks.
PREFIX_CHARS = 512
PREFIX_TOKENS = 128


def prompt_prefix(request_json: str) -> str:
    """The start of an EngineRequest's prompt, as text: rows whose prompts start alike
    (and that use the same LoRA adapter, whose KV cache is its own) share KV-cache
    blocks on the replica that computed them."""
    request = json.loads(request_json)
    if request.get("prompt_token_ids"):  # tokenized already: its first KV-cache block
        return f"{request.get('adapter') or ''}\0{request['prompt_token_ids'][:PREFIX_TOKENS]}"
    if request.get("messages"):
        text = "\0".join(f"{m.get('role')}\0{m.get('content')}" for m in request["messages"])
    elif request.get("inputs"):  # an embeddings row: its first item (else all would share "None")
        text = str(request["inputs"][0])
    else:
        text = str(request.get("prompt"))
    return f"{request.get('adapter') or ''}\0{text}"[:PREFIX_CHARS]


# The JSON inside the `result` column: what an engine answered.
class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprob(TopLogprob):
    top: list[TopLogprob]


class Choice(BaseModel):
    text: Optional[str]  # a chat choice's content: null when it is only tool calls
    finish_reason: Optional[str]
    completion_tokens: int
    logprobs: Optional[list[TokenLogprob]] = None
    # Set by models served with a reasoning or tool-call parser (engines/chat_frontend.py).
    reasoning_content: Optional[str] = None
    reasoning_tokens: Optional[int] = None
    tool_calls: Optional[list[dict[str, Any]]] = None


class EngineResult(BaseModel):
    prompt_tokens: int
    cached_tokens: int
    prompt_text: Optional[str] = None  # only for completions with `echo`
    adapter: Optional[str] = None  # the LoRA adapter that answered: the output's `model`
    choices: list[Choice] = []
    # Embeddings: one per input item, in the row's encoding (floats or a base64 string).
    embeddings: Optional[list[Union[list[float], str]]] = None
