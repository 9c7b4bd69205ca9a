"""Wire formats: what users write (input lines, job parameters) and what they get back
(output envelopes, job progress). Logic lives elsewhere; these are only shapes and
per-field rules.

Input lines follow the OpenAI batch format; output lines follow the OpenAI batch output
envelope, checked in the tests against vLLM's own `BatchRequestOutput`. Job-level models
use the camelCase JSON names of the Fireworks API.
"""

from __future__ import annotations

import enum
import json
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)
from pydantic.alias_generators import to_camel

# Longest custom_id a line may carry (UTF-8 bytes) unless RunConfig says otherwise. An id
# is echoed into both output files; OpenAI's batch API takes ids of this order.
DEFAULT_MAX_CUSTOM_ID_BYTES = 512

# Per-job bounds on what one row may ask the engine for, unless RunConfig says otherwise.
# Each costs engine time or memory a line's byte size does not show: a 1 KB line can ask
# for 16 choices of the whole context, 20 alternatives per token, or a grammar compiled
# from a large schema.
DEFAULT_MAX_OUTPUT_TOKENS = 4096
DEFAULT_MAX_N = 16
DEFAULT_MAX_TOP_LOGPROBS = 5
DEFAULT_MAX_JSON_SCHEMA_BYTES = 32 << 10
# Bounds on the images of one chat row (`image_url` parts), unless RunConfig says
# otherwise. Each image travels with its row through every stage as base64, so the
# bytes per image times the images per row bound what one row holds in memory; the
# fetch timeout bounds how long one URL holds up its batch's preparation.
DEFAULT_MAX_IMAGE_BYTES = 8 << 20
DEFAULT_MAX_IMAGES_PER_ROW = 8
DEFAULT_IMAGE_FETCH_TIMEOUT_SECONDS = 10.0
DEFAULT_IMAGE_URL_SCHEMES = ("https", "s3")

CHAT_URL = "/v1/chat/completions"
COMPLETIONS_URL = "/v1/completions"
EMBEDDINGS_URL = "/v1/embeddings"  # answered only by a model whose engine.task is "embed"
SUPPORTED_URLS = (CHAT_URL, COMPLETIONS_URL, EMBEDDINGS_URL)
# Most inputs one embeddings row may carry, as OpenAI's embeddings API allows. They share
# one row's pool slot and engine time, so the bound keeps one row from holding a replica.
MAX_EMBEDDING_INPUTS = 2048


class ErrorCode(str, enum.Enum):
    """Codes of the error file's `error.code`. One per way a line can fail."""

    INVALID_JSON = "invalid_json"
    INVALID_REQUEST = "invalid_request"
    MISSING_CUSTOM_ID = "missing_custom_id"
    DUPLICATE_CUSTOM_ID = "duplicate_custom_id"
    LINE_TOO_LARGE = "line_too_large"
    CUSTOM_ID_TOO_LONG = "custom_id_too_long"
    # Over one of the job's bounds on expensive rows (RunConfig.max_output_tokens, ...).
    MAX_TOKENS_TOO_LARGE = "max_tokens_too_large"
    N_TOO_LARGE = "n_too_large"
    LOGPROBS_TOO_LARGE = "logprobs_too_large"
    JSON_SCHEMA_TOO_LARGE = "json_schema_too_large"
    # tools with tool_choice other than "none" for a model whose catalog entry names no
    # tool-call parser (engine_args.tool_call_parser): its calls could not be read back.
    TOOLS_NOT_SUPPORTED = "tools_not_supported"

    # Images in chat rows (pipeline/images.py): a URL of a scheme the job does not fetch
    # (file://, or http:// unless the operator allows it), a fetch that failed or timed
    # out, an image past max_image_bytes, more images than max_images_per_row, bytes
    # that are no image, and images sent to a model that takes text only.
    IMAGE_URL_UNSUPPORTED = "image_url_unsupported"
    IMAGE_FETCH_FAILED = "image_fetch_failed"
    IMAGE_TOO_LARGE = "image_too_large"
    TOO_MANY_IMAGES = "too_many_images"
    INVALID_IMAGE = "invalid_image"
    IMAGES_NOT_SUPPORTED = "images_not_supported"
    CONTEXT_LENGTH_EXCEEDED = "context_length_exceeded"
    # The row's url is not what the job's model serves: a /v1/embeddings row on a
    # generation model, or a chat or completion row on an embedding model.
    UNSUPPORTED_URL_FOR_MODEL = "unsupported_url_for_model"
    # An embeddings row's `dimensions` the model cannot give (no Matryoshka support, or
    # a size it was not trained for).
    DIMENSIONS_NOT_SUPPORTED = "dimensions_not_supported"
    ENGINE_ERROR = "engine_error"
    # body.model names neither the job's base model nor one of its LoRA adapters
    # (raybatch/adapters.py); OpenAI's code for a model it does not serve.
    MODEL_NOT_FOUND = "model_not_found"


class Precision(str, enum.Enum):
    """The seed's precision names. `raybatch.precision` maps each to engine arguments."""

    PRECISION_UNSPECIFIED = "PRECISION_UNSPECIFIED"
    FP16 = "FP16"
    FP8 = "FP8"
    FP8_MM = "FP8_MM"
    FP8_AR = "FP8_AR"
    FP8_MM_KV_ATTN = "FP8_MM_KV_ATTN"
    FP8_KV = "FP8_KV"
    FP8_MM_V2 = "FP8_MM_V2"
    FP8_V2 = "FP8_V2"
    FP8_MM_KV_ATTN_V2 = "FP8_MM_KV_ATTN_V2"
    NF4 = "NF4"
    FP4 = "FP4"
    BF16 = "BF16"
    FP4_BLOCKSCALED_MM = "FP4_BLOCKSCALED_MM"
    FP4_MX_MOE = "FP4_MX_MOE"


# Integer bounds the engine can carry: vLLM takes a seed as a 64-bit integer (its own
# API bounds it the same way) and top_k into a 32-bit tensor. Anything wider would fail
# inside the engine, blamed on no row, instead of being this row's invalid_request.
INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1
INT32_MAX = (1 << 31) - 1


class CamelModel(BaseModel):
    """Job-level JSON uses camelCase names; Python code uses snake_case."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")


class InferenceParameters(CamelModel):
    """Job-wide sampling defaults. A row's own value wins over these.

    Zero means unset, as proto3 reads it (Fireworks' API is proto3 behind JSON): a body
    built from a proto or copied from a GET carries `maxTokens: 0`, `n: 0`, `topP: 0`,
    `topK: 0`, `extraBody: ""` for fields nobody set. `temperature: 0` stays 0, greedy
    decoding, which is what a user who writes it means."""

    max_tokens: Optional[int] = Field(None, ge=1)
    temperature: Optional[float] = Field(None, ge=0, allow_inf_nan=False)
    top_p: Optional[float] = Field(None, gt=0, le=1, allow_inf_nan=False)
    top_k: Optional[int] = Field(None, ge=-1, le=INT32_MAX)
    n: Optional[int] = Field(None, ge=1)
    extra_body: Optional[str] = Field(
        None, description="A JSON object, as a string, of further body fields for every row."
    )

    @model_validator(mode="before")
    @classmethod
    def _zero_is_unset(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        unset = []
        for name in ("max_tokens", "n", "top_p", "top_k", "extra_body"):
            for key in (name, to_camel(name)):
                value = data.get(key)
                if value == 0 and not isinstance(value, bool) or value == "" and name == "extra_body":
                    unset.append(key)
        return {k: v for k, v in data.items() if k not in unset}

    @field_validator("extra_body")
    @classmethod
    def _extra_body_is_json_object(cls, value: Optional[str]) -> Optional[str]:
        if value is not None:
            try:
                parsed = json.loads(value)
            except ValueError as exc:
                raise ValueError(f"extraBody is not valid JSON: {exc}") from None
            if not isinstance(parsed, dict):
                raise ValueError("extraBody must be a JSON object")
        return value

    def row_defaults(self) -> dict[str, Any]:
        """The body fields these parameters stand for, as a row would spell them."""
        defaults: dict[str, Any] = json.loads(self.extra_body) if self.extra_body else {}
        named = {
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "n": self.n,
        }
        defaults.update({k: v for k, v in named.items() if v is not None})
        return defaults


class JobProgress(CamelModel):
    """The job's counters, kept equal to the committed output files."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore")

    percent: int = 0
    total_input_requests: int = 0
    total_processed_requests: int = 0
    successfully_processed_requests: int = 0
    failed_requests: int = 0
    output_rows: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cached_input_token_count: int = 0


# --------------------------------------------------------------------------- input lines


class _Body(BaseModel):
    """Fields shared by chat and completion bodies. `strict` keeps "5" from passing as 5."""

    model_config = ConfigDict(extra="ignore", strict=True)

    model: Optional[str] = Field(None, description="A LoRA adapter of the job's base model, or the "
                                 "base model itself (raybatch/adapters.py); ignored for a "
                                 "model without adapters: the job's model serves every row.")
    max_tokens: Optional[int] = Field(None, ge=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    temperature: Optional[float] = Field(None, ge=0, allow_inf_nan=False)
    top_p: Optional[float] = Field(None, gt=0, le=1, allow_inf_nan=False)
    top_k: Optional[int] = Field(None, ge=-1, le=INT32_MAX)
    n: Optional[int] = Field(None, ge=1)
    stop: Optional[Union[str, list[str]]] = None
    seed: Optional[int] = Field(None, ge=INT64_MIN, le=INT64_MAX)
    presence_penalty: Optional[float] = Field(None, ge=-2, le=2, allow_inf_nan=False)
    frequency_penalty: Optional[float] = Field(None, ge=-2, le=2, allow_inf_nan=False)
    repetition_penalty: Optional[float] = Field(None, gt=0, allow_inf_nan=False)
    min_tokens: Optional[int] = Field(None, ge=0)
    ignore_eos: Optional[bool] = None
    response_format: Optional["ResponseFormat"] = None

    @property
    def output_limit(self) -> Optional[int]:
        return self.max_completion_tokens or self.max_tokens


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="ignore")

    name: Optional[str] = None
    schema_: dict[str, Any] = Field(alias="schema")
    strict: Optional[bool] = None


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["text", "json_object", "json_schema"]
    json_schema: Optional[JsonSchemaFormat] = None

    @model_validator(mode="after")
    def _schema_given_for_json_schema(self) -> "ResponseFormat":
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("response_format of type json_schema needs a json_schema object")
        return self


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    type: Literal["text"]
    text: str


class FunctionDefinition(BaseModel):
    """A tool's function, as the chat template and the tool-call grammar receive it."""

    model_config = ConfigDict(extra="forbid", strict=True)

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    description: Optional[str] = None
    parameters: Optional[dict[str, Any]] = None
    strict: Optional[bool] = None


class ToolDefinition(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    name: str


class NamedToolChoice(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    type: Literal["function"]
    function: NamedFunction


class CalledFunction(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    name: str
    arguments: str = Field(description="The arguments as a JSON string, as OpenAI writes them.")


class ToolCall(BaseModel):
    """A call the assistant made: in an earlier turn of the input, or in the output."""

    model_config = ConfigDict(extra="forbid", strict=True)

    id: str
    type: Literal["function"] = "function"
    function: CalledFunction


class ImageUrl(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    url: str = Field(description="A data: URL (base64), or a URL of a scheme the job fetches.")
    detail: Optional[Literal["auto", "low", "high"]] = Field(
        None, description="Accepted and ignored: the model's own processor sets the resolution."
    )


class ImagePart(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    type: Literal["image_url"]
    image_url: ImageUrl


ContentPart = Annotated[Union[TextPart, ImagePart], Field(discriminator="type")]


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Optional[Union[str, list[ContentPart]]] = None
    name: Optional[str] = None
    tool_calls: Optional[list[ToolCall]] = None  # an assistant turn's calls
    tool_call_id: Optional[str] = None  # which call a tool turn answers

    @model_validator(mode="after")
    def _tool_fields_fit_the_role(self) -> "ChatMessage":
        if self.tool_calls is not None and self.role != "assistant":
            raise ValueError("only assistant messages may carry tool_calls")
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("a tool message needs the tool_call_id of the call it answers")
        return self

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content if isinstance(part, TextPart))

    def image_urls(self) -> list[str]:
        if not isinstance(self.content, list):
            return []
        return [part.image_url.url for part in self.content if isinstance(part, ImagePart)]

    def template_fields(self) -> dict[str, Any]:
        """The message as the chat template reads it: text content, and the tool fields
        only where set (a plain message stays {role, content})."""
        fields: dict[str, Any] = {"role": self.role, "content": self.text()}
        if self.tool_calls is not None:
            fields["tool_calls"] = [call.model_dump() for call in self.tool_calls]
            if self.content is None:
                fields["content"] = None
        if self.tool_call_id is not None:
            fields["tool_call_id"] = self.tool_call_id
        return fields


class ChatCompletionBody(_Body):
    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: Optional[bool] = None
    top_logprobs: Optional[int] = Field(None, ge=0, le=20)
    tools: Optional[list[ToolDefinition]] = Field(None, min_length=1)
    tool_choice: Optional[Union[Literal["none", "auto", "required"], NamedToolChoice]] = None
    parallel_tool_calls: Optional[bool] = None

    @model_validator(mode="after")
    def _tool_choice_fits_tools(self) -> "ChatCompletionBody":
        # OpenAI's rules (vLLM's ChatCompletionRequest checks the same).
        choice = self.tool_choice
        if choice is not None and choice != "none" and not self.tools:
            raise ValueError("tool_choice needs tools")
        if isinstance(choice, NamedToolChoice):
            names = [tool.function.name for tool in self.tools]
            if choice.function.name not in names:
                raise ValueError(
                    f"tool_choice names function {choice.function.name!r}, which is not in tools ({', '.join(names)})"
                )
        return self


class CompletionBody(_Body):
    prompt: Union[str, list[int]]
    logprobs: Optional[int] = Field(None, ge=0, le=20)
    echo: Optional[bool] = None

    @field_validator("prompt")
    @classmethod
    def _prompt_not_empty(cls, value: Union[str, list[int]]) -> Union[str, list[int]]:
        if len(value) == 0:
            raise ValueError("prompt must not be empty")
        return value


class EmbeddingBody(BaseModel):
    """An OpenAI embeddings body. `input` is one text, a list of texts, one list of token
    ids or a list of them; each is embedded on its own, in order. `user` is accepted and
    ignored, as `model` is (the job's model serves every row)."""

    model_config = ConfigDict(extra="ignore", strict=True)

    model: Optional[str] = Field(None, description="Ignored: the job's model serves every row.")
    input: Union[str, list[str], list[int], list[list[int]]]
    dimensions: Optional[int] = Field(None, ge=1)
    encoding_format: Literal["float", "base64"] = "float"
    user: Optional[str] = None

    @field_validator("input")
    @classmethod
    def _inputs_not_empty(cls, value):
        inputs = [value] if isinstance(value, str) or value and isinstance(value[0], int) else value
        if not inputs:
            raise ValueError("input must not be an empty list")
        if len(inputs) > MAX_EMBEDDING_INPUTS:
            raise ValueError(f"input may hold at most {MAX_EMBEDDING_INPUTS} items; it holds {len(inputs)}")
        if any(len(item) == 0 for item in inputs):
            raise ValueError("input must not hold an empty string or an empty list of token ids")
        return value

    def inputs(self) -> list[Union[str, list[int]]]:
        """The items to embed, in output order: a single text or token list is one."""
        single = isinstance(self.input, str) or isinstance(self.input[0], int)
        return [self.input] if single else list(self.input)


class BatchInputLine(BaseModel):
    """One line of the input file."""

    model_config = ConfigDict(extra="ignore", strict=True)

    custom_id: str
    method: Literal["POST"] = "POST"
    url: str = CHAT_URL
    body: dict[str, Any]


# -------------------------------------------------------------------------- output lines


class CompletionTokensDetails(BaseModel):
    cached_tokens: int = 0


class OutputTokensDetails(BaseModel):
    """OpenAI's `usage.completion_tokens_details`: of the completion tokens, how many
    were reasoning. Only for models served with a reasoning parser."""

    reasoning_tokens: int


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int  # reasoning tokens included, as OpenAI counts them
    total_tokens: int
    prompt_tokens_details: CompletionTokensDetails
    completion_tokens_details: Optional[OutputTokensDetails] = Field(None, exclude_if=lambda v: v is None)


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: Optional[str]
    # Present only when there is one, as OpenAI and vLLM write them.
    reasoning_content: Optional[str] = Field(None, exclude_if=lambda v: v is None)
    tool_calls: Optional[list[ToolCall]] = Field(None, exclude_if=lambda v: not v)


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: Optional[dict[str, Any]] = None
    finish_reason: Optional[str]


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class TextChoice(BaseModel):
    index: int
    text: str
    logprobs: Optional[dict[str, Any]] = None
    finish_reason: Optional[str]


class TextCompletion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[TextChoice]
    usage: Usage


class Embedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: Union[list[float], str] = Field(description="Floats, or base64 of little-endian float32.")


class EmbeddingUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingResponse(BaseModel):
    """OpenAI's embeddings response (it has no id and no created time)."""

    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    usage: EmbeddingUsage


class BatchResponse(BaseModel):
    status_code: int
    request_id: str
    body: Union[ChatCompletion, TextCompletion, EmbeddingResponse, dict[str, Any]]


class BatchError(BaseModel):
    code: ErrorCode
    message: str
    line: int = Field(description="1-based line number in `file`.")
    file: str = Field(description="The input shard, relative to the input location.")


class BatchOutputLine(BaseModel):
    """One line of results.jsonl (`error` null) or errors.jsonl (`error` set)."""

    id: str
    custom_id: Optional[str]
    response: Optional[BatchResponse]
    error: Optional[BatchError]

