"""The API's error format, for every way a request can be refused: an `ApiError` raised
by a route (or by the scheduler actor, which arrives wrapped), a routing error (no such
path, wrong method), and query parameters FastAPI cannot parse.

The body is what Fireworks' REST gateway (grpc-gateway) answers, `{"code": <gRPC code
number>, "message", "details": []}`, with raybatch's earlier `{"error": {"code": <HTTP
status>, "message", "status": <gRPC code name>}}` beside it in the same body, so that
scripts written against either keep working. The fireworks-ai SDK picks its exception
class by the HTTP status alone (`_make_status_error`) and keeps the body as `.body`."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from raybatch.exceptions import ApiError, InvalidArgument

# google.rpc.Code: the number Fireworks' gateway puts in `code`, by name.
GRPC_CODES = {"OK": 0, "CANCELLED": 1, "UNKNOWN": 2, "INVALID_ARGUMENT": 3, "DEADLINE_EXCEEDED": 4, "NOT_FOUND": 5,
              "ALREADY_EXISTS": 6, "PERMISSION_DENIED": 7, "RESOURCE_EXHAUSTED": 8, "FAILED_PRECONDITION": 9,
              "ABORTED": 10, "OUT_OF_RANGE": 11, "UNIMPLEMENTED": 12, "INTERNAL": 13, "UNAVAILABLE": 14,
              "DATA_LOSS": 15, "UNAUTHENTICATED": 16}
HTTP_STATUS_NAMES = {400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED", 404: "NOT_FOUND",
                     405: "UNIMPLEMENTED", 409: "ALREADY_EXISTS", 413: "RESOURCE_EXHAUSTED", 429: "RESOURCE_EXHAUSTED"}


def error_body(http_status: int, status: str, message: str) -> dict:
    """Fireworks' gateway body, and raybatch's earlier `error` object beside it."""
    return {"code": GRPC_CODES.get(status, GRPC_CODES["UNKNOWN"]), "message": message, "details": [],
            "error": {"code": http_status, "message": message, "status": status}}


def error_response(error: ApiError) -> JSONResponse:
    body = error_body(error.http_status, error.status, error.message)
    retry_after = getattr(error, "retry_after", None)  # RateLimited
    headers = {"Retry-After": str(retry_after)} if retry_after else None
    return JSONResponse(body, status_code=error.http_status, headers=headers)


async def _api_error(request: Request, error: ApiError) -> JSONResponse:
    # An ApiError raised in the scheduler actor arrives wrapped; its cause carries the data.
    return error_response(getattr(error, "cause", None) or error)


async def _http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
    """Routing errors (no such path, wrong method) in the same error format."""
    status = HTTP_STATUS_NAMES.get(error.status_code, "UNKNOWN")
    return JSONResponse(error_body(error.status_code, status, str(error.detail)), status_code=error.status_code)


async def _query_error(request: Request, error: RequestValidationError) -> JSONResponse:
    problems = "; ".join(f"{'.'.join(map(str, e['loc'][1:]))}: {e['msg']}" for e in error.errors())
    return error_response(InvalidArgument(f"invalid request: {problems}"))


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _query_error)
