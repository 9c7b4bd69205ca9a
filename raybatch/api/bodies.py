"""Request and response bodies of the routes: a JSON body read into its pydantic model
(400 naming what is wrong), a model written as wire JSON, and a streamed body written
to storage off the event loop."""

from __future__ import annotations

from contextlib import asynccontextmanager
from typing import Any

from fastapi import Request
from pydantic import BaseModel, ValidationError
from starlette.concurrency import run_in_threadpool

from raybatch.exceptions import InvalidArgument


async def read_body(request: Request, model: type[BaseModel]) -> Any:
    raw = await request.body()
    try:
        return model.model_validate_json(raw or b"{}")
    except ValidationError as error:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg']}" for e in error.errors())
        raise InvalidArgument(f"invalid request body: {problems}") from None


def to_json(model: BaseModel) -> dict:
    return model.model_dump(mode="json", by_alias=True, exclude_none=True)


@asynccontextmanager
async def writer_off_loop(location, relative: str):
    """`location.open_atomic_writer(relative)`, opened, written and published (or
    abandoned) in the thread pool; bytes are handed over a MiB at a time."""
    writer = await run_in_threadpool(location.open_atomic_writer, relative)
    pending = bytearray()

    async def write(chunk: bytes) -> None:
        pending.extend(chunk)
        if len(pending) >= 1 << 20:
            await run_in_threadpool(writer.write, bytes(pending))
            pending.clear()

    try:
        yield write
        if pending:
            await run_in_threadpool(writer.write, bytes(pending))
    except BaseException as error:
        await run_in_threadpool(writer.__exit__, type(error), error, error.__traceback__)  # discards it
        raise
    await run_in_threadpool(writer.__exit__, None, None, None)
