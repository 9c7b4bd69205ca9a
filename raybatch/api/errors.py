"""The API's error format, `{"error": {"code", "message", "status"}}`, for every way a
request can be refused: an `ApiError` raised by a route (or by the scheduler actor,
which arrives wrapped), a routing error (no such path, wrong method), and query
parameters FastAPI cannot parse."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from raybatch.exceptions import ApiError, InvalidArgument

HTTP_STATUS_NAMES = {400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED", 404: "NOT_FOUND",
                     405: "UNIMPLEMENTED", 409: "ALREADY_EXISTS", 413: "RESOURCE_EXHAUSTED", 429: "RESOURCE_EXHAUSTED"}


def error_response(error: ApiError) -> JSONResponse:
    body = {"error": {"code": error.http_status, "message": error.message, "status": error.status}}
    retry_after = getattr(error, "retry_after", None)  # RateLimited
    headers = {"Retry-After": str(retry_after)} if retry_after else None
    return JSONResponse(body, status_code=error.http_status, headers=headers)


async def _api_error(request: Request, error: ApiError) -> JSONResponse:
    # An ApiError raised in the scheduler actor arrives wrapped; its cause carries the data.
    return error_response(getattr(error, "cause", None) or error)


async def _http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
    """Routing errors (no such path, wrong method) in the same error format."""
    status = HTTP_STATUS_NAMES.get(error.status_code, "UNKNOWN")
    body = {"error": {"code": error.status_code, "message": str(error.detail), "status": status}}
    return JSONResponse(body, status_code=error.status_code)


async def _query_error(request: Request, error: RequestValidationError) -> JSONResponse:
    problems = "; ".join(f"{'.'.join(map(str, e['loc'][1:]))}: {e['msg']}" for e in error.errors())
    return error_response(InvalidArgument(f"invalid request: {problems}"))


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _query_error)
