"""Chat rows with images, in the replica: vLLM's own chat path (the renderer that its
OpenAI server uses) applies the model's chat template, decodes the images (data: URLs
that preprocess checked, pipeline/images.py) and runs the model's processor, which
expands each image's placeholder into the image tokens the model reads. Text-only rows
keep VllmEngine's own tokenization.
"""

from __future__ import annotations

from typing import Any

from raybatch.exceptions import RowError
from raybatch.pipeline.rows import EngineRequest
from raybatch.protocol import ErrorCode


async def render_with_images(llm: Any, request: EngineRequest) -> tuple[Any, int]:
    """The engine input of an image row (for `AsyncLLM.generate`) and its prompt length
    in tokens, image tokens included, as vLLM counts them. Raises RowError."""
    from vllm.exceptions import VLLMValidationError
    from vllm.renderers.params import ChatParams

    config = llm.model_config
    if not config.is_multimodal_model:
        raise RowError(
            ErrorCode.IMAGES_NOT_SUPPORTED,
            f"this request has {request.images} image(s), but the model {config.served_model_name} takes text only",
        )
    params = ChatParams(chat_template_kwargs={"add_generation_prompt": True})
    try:
        (_,), (engine_input,) = await llm.renderer.render_chat_async([request.messages], params)
    except VLLMValidationError as exc:
        # The prompt with its image tokens is past the context: vLLM says so as it
        # tokenizes (a text row is measured by VllmEngine._max_tokens instead).
        code = ErrorCode.CONTEXT_LENGTH_EXCEEDED if exc.parameter == "input_tokens" else ErrorCode.INVALID_REQUEST
        raise RowError(code, str(exc.args[0]) if exc.args else str(exc)) from None
    except Exception as exc:  # the template, the processor or vLLM's per-prompt limits refused it
        raise RowError(ErrorCode.INVALID_REQUEST, f"{type(exc).__name__}: {exc}") from None
    return engine_input, len(engine_input["prompt_token_ids"])
