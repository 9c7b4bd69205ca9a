"""The LoRA side of a vLLM replica: a row's adapter as vLLM's `LoRARequest`.

vLLM loads an adapter the first time a request names it and keeps up to `max_cpu_loras`
of them (by default `max_loras`) loaded, evicting the least recently used. It knows an
adapter by its integer id, so each (name, path) gets one id for the replica's life: the
same adapter is never loaded twice under two ids, and a changed path is a new adapter.
"""

from __future__ import annotations

import os
from typing import Any, Optional

from raybatch.adapters import adapter_files_missing
from raybatch.exceptions import RowError
from raybatch.pipeline.rows import EngineRequest
from raybatch.protocol import ErrorCode


class AdapterRequests:
    def __init__(self, lora_config: Any = None) -> None:
        """`lora_config`: the engine's vLLM `LoRAConfig`, to check adapters against."""
        self._lora_config = lora_config
        self._ids: dict[tuple[str, str], int] = {}
        self._checked: set[str] = set()

    def request(self, request: EngineRequest) -> Optional[Any]:
        """The `LoRARequest` of `request`'s adapter; None for the base model. Raises
        RowError(engine_error) for an adapter vLLM would fail to load (no
        adapter_config.json in its local folder; a rank above max_lora_rank, DoRA, a
        bias, ...): vLLM loads adapters inside the engine core, and in vLLM 0.32 a
        failed load there kills the whole engine and every request in flight on it. So
        vLLM's own checks (`PEFTHelper.validate_legal`) run here first. An adapter given
        as a Hugging Face ID is fetched by the engine and not checked beforehand."""
        if request.adapter is None:
            return None
        from vllm.lora.request import LoRARequest

        path = request.adapter_path or ""
        self._check(request.adapter, path)
        # vLLM reads a local folder or a Hugging Face ID; it knows no file:// URLs.
        path = os.path.expanduser(path.removeprefix("file://"))
        key = (request.adapter, path)
        if key not in self._ids:
            self._ids[key] = len(self._ids) + 1  # vLLM's ids start at 1
        return LoRARequest(lora_name=request.adapter, lora_int_id=self._ids[key], lora_path=path)

    def _check(self, name: str, path: str) -> None:
        if path in self._checked:
            return
        if adapter_files_missing(path):
            raise RowError(
                ErrorCode.ENGINE_ERROR,
                f"LoRA adapter {name!r} cannot be loaded: no adapter_config.json in {path!r} on this node",
            )
        folder = os.path.expanduser(path.removeprefix("file://"))
        if self._lora_config is not None and os.path.isdir(folder):
            from vllm.lora.peft_helper import PEFTHelper

            try:
                PEFTHelper.from_local_dir(folder, None).validate_legal(self._lora_config)
            except (ValueError, TypeError, OSError) as exc:  # json's errors are ValueErrors
                raise RowError(ErrorCode.ENGINE_ERROR, f"LoRA adapter {name!r} cannot be loaded: {exc}") from None
        self._checked.add(path)
