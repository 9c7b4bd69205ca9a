"""The part of vLLM's OpenAI server that a batch of chat rows needs, around the bare
engine: render the conversation (tools included) with the chat template, constrain the
output the way the server does for `tool_choice`, and split what the model wrote into
reasoning, content and tool calls with the model's parsers.

Everything model-specific is vLLM's own: its `ChatCompletionRequest` checks the tool
fields, the `Parser` that `ParserManager` composes from the catalog entry's
`tool_call_parser` and `reasoning_parser` adjusts the request (the structural tag or
JSON schema that forces a valid call for `required` or a named function) and parses the
output, as `vllm serve --enable-auto-tool-choice --tool-call-parser ... --reasoning-parser
...` would. What is ours is the decision table below (OpenAI's, as vLLM's
`chat_completion_full_generator` implements it) and the exact counts.

Settings come from the catalog entry's `engine.engine_args`, named as `vllm serve`
names them: `tool_call_parser` and `chat_template` (front-end flags, taken out before
the engine sees its arguments) and `reasoning_parser` (an engine argument too: vLLM
then applies a grammar only after the reasoning ends).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any, Optional

from raybatch.exceptions import RowError
from raybatch.pipeline.prompts import chat_prompt_ids
from raybatch.pipeline.rows import EngineRequest
from raybatch.protocol import ErrorCode

# engine_args keys that belong to the front end, not to vLLM's AsyncEngineArgs.
FRONTEND_ARGS = ("tool_call_parser", "chat_template")


def new_tool_call_id() -> str:
    """OpenAI's shape: `call_` and 24 letters and digits."""
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass
class PreparedChat:
    """A chat row ready for the engine, and what reading its output back needs."""

    prompt_ids: list[int]
    structured_outputs: Any  # vLLM's StructuredOutputsParams, or None
    skip_special_tokens: bool
    engine_kwargs: dict[str, Any]  # reasoning_ended / reasoning_parser_kwargs for generate()
    request: Any  # vLLM's ChatCompletionRequest; None for a row the parsers do not touch


@dataclass
class ParsedChoice:
    content: Optional[str]
    reasoning_content: Optional[str]
    tool_calls: Optional[list[dict[str, Any]]]
    finish_reason: Optional[str]
    reasoning_tokens: Optional[int]  # None: the model has no reasoning parser


class ChatFrontend:
    """One per engine: its tokenizer, chat template and parsers."""

    def __init__(
        self,
        tokenizer: Any,
        model_config: Any = None,
        *,
        tool_call_parser: Optional[str] = None,
        reasoning_parser: Optional[str] = None,
        chat_template: Optional[str] = None,
    ):
        from vllm.parser.parser_manager import ParserManager
        from vllm.renderers.chat_utils import load_chat_template

        self._tokenizer = tokenizer
        self._model_config = model_config
        # A file path or the template itself, as vllm serve's --chat-template takes it.
        self._chat_template = load_chat_template(chat_template) if chat_template else None
        self._has_tool_parser = bool(tool_call_parser)
        # Raises at engine start for a parser name vLLM does not know, or one whose
        # markup the tokenizer lacks: the catalog entry is wrong, not any row.
        self._parser_cls = ParserManager.get_parser(
            tool_parser_name=tool_call_parser or None,
            reasoning_parser_name=reasoning_parser or None,
            enable_auto_tools=bool(tool_call_parser),
            model_name=getattr(model_config, "model", None),
            tokenizer=tokenizer,
        )
        self.has_reasoning_parser = self._parser_cls is not None and self._parser_cls.reasoning_parser_cls is not None

    def _parser(self, request: Any) -> Any:
        return self._parser_cls(self._tokenizer, request.tools, model_config=self._model_config)

    def prepare(self, request: EngineRequest) -> PreparedChat:
        """Render the row and build its output constraint. Raises RowError."""
        prompt_ids = request.prompt_token_ids  # rendered in the pipeline (pipeline/prompts.py)
        if prompt_ids is None:
            prompt_ids = chat_prompt_ids(self._tokenizer, request.messages, tools=request.tools,
                                         chat_template=self._chat_template)
        structured = None
        if request.structured_output:
            from vllm.sampling_params import StructuredOutputsParams

            structured = StructuredOutputsParams(**request.structured_output)
        if not request.tools and not self.has_reasoning_parser:
            # Nothing to parse: a plain row is what it would be with no parsers at all.
            return PreparedChat(prompt_ids, structured, True, {}, None)
        vllm_request = self._vllm_request(request, structured)
        parser = None
        if self._parser_cls is not None:
            parser = self._parser(vllm_request)
            # As vLLM's renderer: adjust for tools unless tool_choice is "none", and
            # always for a reasoning model.
            if self.has_reasoning_parser or vllm_request.tool_choice != "none":
                try:
                    vllm_request = parser.adjust_request(vllm_request)
                except ValueError as exc:  # e.g. a tool schema xgrammar cannot compile
                    raise RowError(ErrorCode.INVALID_REQUEST, f"tools: {exc}") from None
        engine_kwargs: dict[str, Any] = {}
        if self.has_reasoning_parser:
            engine_kwargs = {
                "reasoning_ended": vllm_request.resolve_reasoning_ended(parser, prompt_ids),
                "reasoning_parser_kwargs": {"chat_template_kwargs": {}},
            }
        return PreparedChat(
            prompt_ids,
            vllm_request.structured_outputs,
            vllm_request.skip_special_tokens,
            engine_kwargs,
            vllm_request,
        )

    def _vllm_request(self, request: EngineRequest, structured: Any) -> Any:
        from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest

        fields: dict[str, Any] = {"messages": request.messages, "structured_outputs": structured}
        if request.tools:
            fields["tools"] = request.tools
            if request.tool_choice is not None:
                fields["tool_choice"] = request.tool_choice
            if request.parallel_tool_calls is not None:
                fields["parallel_tool_calls"] = request.parallel_tool_calls
        try:
            vllm_request = ChatCompletionRequest.model_validate(fields)
        except ValueError as exc:  # pydantic's ValidationError and vLLM's are both ValueErrors
            raise RowError(ErrorCode.INVALID_REQUEST, f"invalid body: {exc}") from None
        if vllm_request.tools and vllm_request.tool_choice != "none" and not self._has_tool_parser:
            # vLLM's server refuses these too: without a parser the calls could not be
            # read back out of the text.
            choice = vllm_request.tool_choice
            described = f"function {choice.function.name!r}" if not isinstance(choice, str) else repr(choice)
            raise RowError(
                ErrorCode.TOOLS_NOT_SUPPORTED,
                f"tool_choice {described} needs a tool-call parser, and this model's catalog entry names none "
                "(engine_args.tool_call_parser); send tool_choice \"none\" or use a model served with one",
            )
        return vllm_request

    def finish(self, prepared: PreparedChat, text: str, token_ids: Any, finish_reason: Optional[str]) -> ParsedChoice:
        """One choice of the output, read back as OpenAI's message fields."""
        request = prepared.request
        if request is None or self._parser_cls is None:  # no tools, or tools and tool_choice "none" without parsers
            return ParsedChoice(text, None, None, finish_reason, None)
        from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionNamedToolChoiceParam

        parser = self._parser(request)  # parsers keep state: one per choice, as vLLM does
        parser.set_prompt_token_ids(prepared.prompt_ids)
        reasoning, content, calls = parser.parse(text, request, enable_auto_tools=True, model_output_token_ids=token_ids)
        reasoning_tokens = None
        if self.has_reasoning_parser:
            reasoning_tokens = self._reasoning_tokens(parser, token_ids, reasoning)

        choice = request.tool_choice
        named = isinstance(choice, ChatCompletionNamedToolChoiceParam)
        tool_calls: list[dict[str, Any]] = []
        if self._has_tool_parser and request.tools and choice != "none":
            tool_calls = [
                {
                    # A parser's own id where the model's format has one (Kimi's
                    # "functions.name:0"); vLLM's random ones become OpenAI's "call_".
                    "id": call.id if call.id and not call.id.startswith("chatcmpl-tool-") else new_tool_call_id(),
                    "type": "function",
                    "function": {"name": call.name, "arguments": call.arguments},
                }
                for call in calls or []
            ]
            if request.parallel_tool_calls is False:
                tool_calls = tool_calls[:1]
            if named or choice == "required":
                content = content or None
        # OpenAI: "tool_calls" when the model chose to call (auto) or had to (required);
        # a named function keeps "stop".
        if (choice == "auto" and tool_calls) or (choice == "required" and finish_reason == "stop"):
            finish_reason = "tool_calls"
        return ParsedChoice(content, reasoning, tool_calls or None, finish_reason, reasoning_tokens)

    @staticmethod
    def _reasoning_tokens(parser: Any, token_ids: Any, reasoning: Optional[str]) -> int:
        """Output tokens spent reasoning. vLLM counts the tokens between the start and
        end markers; a template that opens the reasoning itself (DeepSeek-R1's, Qwen3's)
        leaves no start marker in the output and that count is 0. Then: the tokens before
        the end marker, or all of them while it never came."""
        counted = parser.count_reasoning_tokens(token_ids)
        if counted or not reasoning:
            return counted
        ids = list(token_ids)
        end = getattr(parser.reasoning_parser, "end_token_id", None)
        return ids.index(end) if end in ids else len(ids)
