"""`BodyLimit`: 413 for a request body over its limit, before the route reads it."""

from __future__ import annotations

from raybatch.api.errors import error_response
from raybatch.api.signing import SIGNED_PREFIX
from raybatch.config import ServiceConfig
from raybatch.exceptions import PayloadTooLarge

# The replica's settings, set by its constructor (`RaybatchApi.__init__`). The
# middleware is built by Starlette from the class alone, so it reads them here.
SETTINGS: dict[str, ServiceConfig] = {"config": ServiceConfig()}


class BodyLimit:
    """ASGI middleware: 413 for a body over its limit, counted as it streams (a
    Content-Length is not trusted, and chunked bodies have none)."""

    def __init__(self, app):
        self.app = app

    def _limit(self, path: str) -> int:
        config = SETTINGS["config"]
        if path.endswith(":upload"):
            return config.max_upload_bytes
        if path.startswith(SIGNED_PREFIX):
            return config.max_dataset_bytes
        return config.max_json_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = self._limit(scope["path"])
        declared = dict(scope.get("headers") or []).get(b"content-length")
        too_large = PayloadTooLarge(f"request body over the limit of {limit} bytes")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            return await error_response(too_large)(scope, receive, send)
        seen = 0

        async def counted_receive():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > limit:
                raise too_large
            return message

        return await self.app(scope, counted_receive, send)
