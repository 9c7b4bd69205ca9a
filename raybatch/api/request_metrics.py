"""`RequestMetrics`: counts every API request by route, method and status
(`raybatch_api_requests`). The route is the matched route's template
(`/v1/accounts/{account}/datasets/{dataset_id}`), never the raw path, so that IDs do
not become label values; a path that matches no route counts as `unmatched`."""

from __future__ import annotations

from raybatch import metrics


class RequestMetrics:
    """ASGI middleware, outermost, so that it also counts what BodyLimit refuses."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = 500  # an exception that escapes every handler

        async def noting_send(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, noting_send)
        finally:
            route = scope.get("route")
            metrics.count_request(getattr(route, "path", "unmatched"), scope["method"], status)
