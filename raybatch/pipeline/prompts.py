"""Stage 3, its second half — prompts rendered before the engine: a chat row's messages
go through the chat template and the tokenizer, a completion's text through the
tokenizer, in the CPU stage, and the replica receives token ids
(`EngineRequest.prompt_token_ids`). The replica's process then only feeds the engine and
reads its output back: its event loop is what keeps the engine busy, and on a GPU a
small model's engine outruns one process that also renders every prompt.

The tokenizer is vLLM's own (`vllm.tokenizers.get_tokenizer`, with the engine's
tokenizer arguments), so the ids are those the replica would have made. Loading it
imports torch and transformers: about 4 s of CPU and 350 MB in the driver here. It
loads in a background thread, and rows prepared meanwhile go as they are, rendered by
the replica as before (`engines/chat_frontend.py`). A job's pipeline in its driver
starts the load only once its first rows are answered (`runner.answered_batches`), so
that neither its first rows nor its engine's start wait for it: on two cores, its
import in front of them (in the job, or in the spare driver that was to run it)
delayed a warm job's first row by 2 to 5 s.
A tokenizer that cannot load here (a driver without the model's files) leaves every row
to the replica, with one warning. Rows with images keep vLLM's chat path, where the
model's processor places the images.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional, Union

from pydantic import BaseModel, ConfigDict

from raybatch.exceptions import RowError
from raybatch.pipeline.rows import EngineRequest
from raybatch.protocol import ErrorCode

if TYPE_CHECKING:
    from raybatch.config import EngineConfig

logger = logging.getLogger(__name__)

class PromptRendering(BaseModel):
    """What rendering a job's prompts takes: the replica's tokenizer and chat template."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    tokenizer: str  # a local path or a Hugging Face ID, as vLLM's `tokenizer` argument
    tokenizer_mode: str = "auto"
    revision: Optional[str] = None
    trust_remote_code: bool = False
    chat_template: Optional[str] = None  # vllm serve's --chat-template: a file or the template
    # The replica's reasoning parser reads a row's messages (engines/chat_frontend.py):
    # they travel with the ids. Rows with tools keep theirs for the tool parser anyway.
    keep_messages: bool = False


def prompt_rendering(engine: "EngineConfig", model: str) -> Optional[PromptRendering]:
    """How a job on `model` renders its prompts before the engine; None: the replica
    renders them (the setting is off, the engine is not vLLM, or it embeds)."""
    if not engine.tokenize_in_pipeline or engine.kind != "vllm" or engine.task != "generate":
        return None
    args = engine.engine_args
    return PromptRendering(
        tokenizer=args.get("tokenizer") or model,
        tokenizer_mode=args.get("tokenizer_mode") or "auto",
        revision=args.get("tokenizer_revision") or args.get("revision"),
        trust_remote_code=bool(args.get("trust_remote_code")),
        chat_template=args.get("chat_template"),
        keep_messages=bool(args.get("reasoning_parser")),
    )


def render_chat(
    tokenizer: Any,
    messages: list[dict[str, Any]],
    *,
    tools: Optional[list[dict[str, Any]]] = None,
    chat_template: Optional[str] = None,
) -> str:
    """The prompt text of a chat row: its messages (and tools, for templates that take
    them) through the chat template. The one place a row meets the template, here or in
    the replica. Raises RowError when the template refuses the conversation (a role
    order, a missing field)."""
    try:
        return tokenizer.apply_chat_template(
            messages, tools=tools, chat_template=chat_template, add_generation_prompt=True, tokenize=False
        )
    except Exception as exc:  # a template may refuse e.g. a role order
        raise RowError(ErrorCode.INVALID_REQUEST, f"chat template refused: {exc}") from None


def chat_prompt_ids(
    tokenizer: Any,
    messages: list[dict[str, Any]],
    *,
    tools: Optional[list[dict[str, Any]]] = None,
    chat_template: Optional[str] = None,
) -> list[int]:
    """A chat row's prompt as token ids: `render_chat`, then the tokenizer without
    special tokens of its own (the template wrote those it wants). The pipeline and the
    replica both call this, so the ids are the same wherever the row is rendered."""
    text = render_chat(tokenizer, messages, tools=tools, chat_template=chat_template)
    return tokenizer.encode(text, add_special_tokens=False)


@dataclass(frozen=True)
class PromptRenderer:
    tokenizer: Any
    chat_template: Optional[str]
    keep_messages: bool

    def render(self, fields: dict[str, Any]) -> dict[str, Any]:
        """An engine request's fields (`preprocess.engine_request_fields`) with the prompt
        as token ids, in EngineRequest's field order. Raises RowError when the chat
        template refuses the conversation."""
        kind = fields["kind"]
        if kind == "chat" and not fields.get("images"):
            ids = chat_prompt_ids(self.tokenizer, fields["messages"], tools=fields.get("tools"),
                                  chat_template=self.chat_template)
            dropped = () if fields.get("tools") or self.keep_messages else ("messages",)
        elif kind == "completion" and isinstance(fields.get("prompt"), str):
            ids, dropped = self.tokenizer.encode(fields["prompt"]), ("prompt",)
        else:  # images, embeddings, a completion given as token ids already
            return fields
        rendered = {**fields, "prompt_token_ids": ids}
        return {name: rendered[name] for name in EngineRequest.model_fields if name in rendered and name not in dropped}


_LOADING = object()
_renderers: dict[PromptRendering, Union[PromptRenderer, None, object]] = {}
_lock = threading.Lock()


def _load(rendering: PromptRendering) -> None:
    try:
        from vllm.renderers.chat_utils import load_chat_template
        from vllm.tokenizers import get_tokenizer

        tokenizer = get_tokenizer(
            rendering.tokenizer,
            tokenizer_mode=rendering.tokenizer_mode,
            revision=rendering.revision,
            trust_remote_code=rendering.trust_remote_code,
        )
        template = load_chat_template(rendering.chat_template) if rendering.chat_template else None
        loaded: Optional[PromptRenderer] = PromptRenderer(tokenizer, template, rendering.keep_messages)
    except Exception as exc:  # the replica renders instead: slower, never wrong
        logger.warning("tokenizer %s did not load in the pipeline (%s: %s); the engine renders "
                       "the prompts", rendering.tokenizer, type(exc).__name__, exc)
        loaded = None
    with _lock:
        _renderers[rendering] = loaded


def ready_renderer(rendering: PromptRendering, wait: bool = False) -> Optional[PromptRenderer]:
    """The renderer of `rendering` if its tokenizer has loaded in this process, else
    None (the rows go as they are). The first call starts the load in a background
    thread; `wait`: load it in this thread instead, if it has not loaded yet (tests,
    tools)."""
    with _lock:
        state = _renderers.get(rendering)
        if rendering not in _renderers:
            _renderers[rendering] = _LOADING
            if not wait:
                # At the process's own priority: a thread at a lower one can be
                # descheduled while it holds the GIL, and then stalls the pipeline's
                # thread behind it (a warm job's first row came at 15.7 s, not 4 s).
                threading.Thread(target=_load, args=(rendering,), name="raybatch-tokenizer", daemon=True).start()
        elif state is not _LOADING or not wait:
            return state if isinstance(state, PromptRenderer) else None
    if wait:
        _load(rendering)
        return _renderers[rendering]  # type: ignore[return-value]
    return None
