"""A deterministic engine behind the `Engine` interface, for fault injection and for
tests that need a job to take a known time. Never the only engine a feature is tested
with: the real one is `VllmEngine`.

Its answer to a request is the request's last message (or prompt) reversed, one token
per character, after `seconds_per_request`. Settings come as `engine_args`:

    seconds_per_request  float, default 0   (how long each request takes)
    invocations_dir      path, optional     (one file per call: proves what ran)
"""

from __future__ import annotations

import asyncio
import os
import uuid
from typing import Any

from raybatch.pipeline.engine import Choice, EngineResult
from raybatch.pipeline.preprocess import EngineRequest


class ScriptedEngine:
    max_model_len = 4096

    def __init__(self, engine_args: dict[str, Any]):
        self._seconds = float(engine_args.get("seconds_per_request", 0))
        self._invocations = engine_args.get("invocations_dir")
        if self._invocations:
            os.makedirs(self._invocations, exist_ok=True)

    async def generate(self, request: EngineRequest) -> EngineResult:
        if self._invocations:
            # One file per call, named by custom_id: a count that survives actor restarts.
            name = f"{request.custom_id.encode().hex()[:200]}.{uuid.uuid4().hex[:8]}"
            open(os.path.join(self._invocations, name), "wb").close()
        if self._seconds:
            await asyncio.sleep(self._seconds)
        text = request.messages[-1]["content"] if request.messages else str(request.prompt)
        answer = text[::-1][: request.max_tokens or 16]
        n = int(request.sampling.get("n") or 1)
        choices = [Choice(text=answer, finish_reason="stop", completion_tokens=len(answer)) for _ in range(n)]
        return EngineResult(prompt_tokens=len(text), cached_tokens=0, choices=choices)
