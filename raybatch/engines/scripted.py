"""A deterministic engine behind the `Engine` interface, for fault injection and for
tests that need a job to take a known time. Never the only engine a feature is tested
with: the real one is `VllmEngine`.

Its answer to a request is the request's last message (or prompt) reversed, one token
per character, after `seconds_per_request`. Settings come as `engine_args`:

    seconds_per_request  float, default 0   (how long each request takes)
    fail_to_start        bool, default false (the engine raises while starting, every time)
    hang_at_start        bool, default false (the engine never finishes starting, every time)
    invocations_dir      path, optional     (one file per call, `<custom_id hex>.<pid>.<n>`,
                                             holding the time of the call: proves what
                                             ran, in which process, and when)

Faults are armed through `raybatch.faults`: engine.kill, engine.die and engine.hang,
counted in calls to one engine process, fire once, so the replaced engine works
(engine.start_hang likewise hangs one start);
engine.poison names a row (`custom_id`, or every row whose id starts with
`custom_id_prefix`) that kills or hangs every engine that answers it; while
engine.gate is armed no request starts (a test lines jobs up, then opens it).
"""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
import uuid
from typing import Any

from raybatch import faults
from raybatch.exceptions import EngineFailure
from raybatch.pipeline.rows import Choice, EngineRequest, EngineResult


class ScriptedEngine:
    max_model_len = 4096

    def __init__(self, engine_args: dict[str, Any]):
        if engine_args.get("fail_to_start"):  # an engine that cannot load its model
            raise RuntimeError("scripted engine refuses to start (fail_to_start)")
        if engine_args.get("hang_at_start") or faults.fires("engine.start_hang", 1):  # one start per process
            threading.Event().wait()  # never set: only the pool's start timeout ends it
        self._seconds = float(engine_args.get("seconds_per_request", 0))
        self._invocations = engine_args.get("invocations_dir")
        if self._invocations:
            os.makedirs(self._invocations, exist_ok=True)
        self._calls = 0

    async def generate(self, request: EngineRequest) -> EngineResult:
        while faults.spec("engine.gate") is not None:  # held until the test opens it
            await asyncio.sleep(0.05)
        self._calls += 1
        if self._invocations:
            # One file per call, named by custom_id: a count that survives actor restarts.
            # The time inside lets a test prove no line was answered after its commit.
            name = f"{request.custom_id.encode().hex()[:200]}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
            with open(os.path.join(self._invocations, name), "w") as record:
                record.write(repr(time.time()))
        poison = faults.spec("engine.poison") or {}
        prefix = poison.get("custom_id_prefix")
        poisoned = poison.get("custom_id") == request.custom_id or bool(prefix and request.custom_id.startswith(prefix))
        if faults.fires("engine.die", self._calls) or poisoned and poison.get("fault") == "die":
            raise EngineFailure("scripted engine death")
        if faults.fires("engine.hang", self._calls) or poisoned and poison.get("fault") == "hang":
            await asyncio.Event().wait()  # never set
        if faults.fires("engine.kill", self._calls):
            os.kill(os.getpid(), signal.SIGKILL)
        if self._seconds:
            await asyncio.sleep(self._seconds)
        text = (request.messages[-1]["content"] or "") if request.messages else str(request.prompt)
        if isinstance(text, list):  # a message with images: its text parts
            text = "".join(part.get("text", "") for part in text)
        answer = text[::-1][: request.max_tokens or 16]
        n = int(request.sampling.get("n") or 1)
        choices = [Choice(text=answer, finish_reason="stop", completion_tokens=len(answer)) for _ in range(n)]
        return EngineResult(prompt_tokens=len(text), cached_tokens=0, choices=choices)
