"""A deterministic engine behind the `Engine` interface, for fault injection and for
tests that need a job to take a known time. Never the only engine a feature is tested
with: the real one is `VllmEngine`.

Its answer to a request is the request's last message (or prompt) reversed, one token
per character, after `seconds_per_request`. Settings come as `engine_args`:

    seconds_per_request  float, default 0   (how long each request takes)
    invocations_dir      path, optional     (one file per call, `<custom_id hex>.<pid>.<n>`:
                                             proves what ran, and in which process)
    fault                "die" | "hang" | "kill", optional: at call `fault_after` of
                         one engine, die (EngineFailure), hang forever, or SIGKILL its
                         own process; once per `fault_marker` file, so the replaced
                         engine works
"""

from __future__ import annotations

import asyncio
import os
import signal
import uuid
from typing import Any

from raybatch.exceptions import EngineFailure
from raybatch.pipeline.engine import Choice, EngineResult
from raybatch.pipeline.preprocess import EngineRequest


class ScriptedEngine:
    max_model_len = 4096

    def __init__(self, engine_args: dict[str, Any]):
        self._seconds = float(engine_args.get("seconds_per_request", 0))
        self._invocations = engine_args.get("invocations_dir")
        if self._invocations:
            os.makedirs(self._invocations, exist_ok=True)
        self._fault = engine_args.get("fault")
        self._fault_after = int(engine_args.get("fault_after", 1))
        self._fault_marker = engine_args.get("fault_marker")
        self._calls = 0

    def _fault_due(self) -> bool:
        """True once across restarts: the marker file is made atomically by one caller."""
        self._calls += 1
        if not self._fault or self._calls != self._fault_after:
            return False
        try:
            os.close(os.open(self._fault_marker, os.O_CREAT | os.O_EXCL))
            return True
        except FileExistsError:
            return False

    async def generate(self, request: EngineRequest) -> EngineResult:
        if self._invocations:
            # One file per call, named by custom_id: a count that survives actor restarts.
            name = f"{request.custom_id.encode().hex()[:200]}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
            open(os.path.join(self._invocations, name), "wb").close()
        if self._fault_due():
            if self._fault == "die":
                raise EngineFailure("scripted engine death")
            if self._fault == "hang":
                await asyncio.Event().wait()  # never set
            if self._fault == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
        if self._seconds:
            await asyncio.sleep(self._seconds)
        text = request.messages[-1]["content"] if request.messages else str(request.prompt)
        answer = text[::-1][: request.max_tokens or 16]
        n = int(request.sampling.get("n") or 1)
        choices = [Choice(text=answer, finish_reason="stop", completion_tokens=len(answer)) for _ in range(n)]
        return EngineResult(prompt_tokens=len(text), cached_tokens=0, choices=choices)
