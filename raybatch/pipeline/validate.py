"""Stage 2 — validate: turn each raw line into a request or an error row.

Every check here is per line and pure, so a bad line costs one error row and nothing
else. The order of the checks decides which code a line with several faults gets:
size, encoding, JSON, shape, custom_id, duplicate, url, body.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Optional, Union

import pyarrow as pa
from pydantic import ValidationError

from raybatch.exceptions import RowError
from raybatch.pipeline.rows import SCAN_SCHEMA, column
from raybatch.protocol import (
    CHAT_URL,
    COMPLETIONS_URL,
    SUPPORTED_URLS,
    BatchInputLine,
    ChatCompletionBody,
    CompletionBody,
    ErrorCode,
)

Body = Union[ChatCompletionBody, CompletionBody]


@dataclass
class ValidatedRequest:
    custom_id: str
    url: str
    body: Body


def is_blank(raw: Optional[bytes]) -> bool:
    return raw is not None and not raw.strip()


def parse_json_line(raw: Optional[bytes], max_line_bytes: int) -> Any:
    """Decode one line. Raises RowError for an oversized, non-UTF-8 or non-JSON line."""
    if raw is None:
        raise RowError(
            ErrorCode.LINE_TOO_LARGE, f"line is longer than the limit of {max_line_bytes} bytes"
        )
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RowError(
            ErrorCode.INVALID_JSON, f"line is not valid UTF-8: {exc.reason} at byte {exc.start}"
        ) from None
    try:
        return json.loads(text)
    except RecursionError:
        raise RowError(ErrorCode.INVALID_JSON, "line is nested too deeply to parse") from None
    except ValueError as exc:  # JSONDecodeError, and ints past Python's digit limit
        raise RowError(ErrorCode.INVALID_JSON, f"line is not valid JSON: {exc}") from None


def readable_custom_id(parsed: Any) -> Optional[str]:
    """The line's custom_id if it is a non-empty string, else None."""
    if isinstance(parsed, dict):
        custom_id = parsed.get("custom_id")
        if isinstance(custom_id, str) and custom_id:
            return custom_id
    return None


def _describe(error: ValidationError) -> str:
    problems = []
    for item in error.errors(include_url=False)[:3]:
        where = ".".join(str(part) for part in item["loc"]) or "body"
        problems.append(f"{where}: {item['msg']}")
    return "; ".join(problems)


def validate_body(url: str, body: dict[str, Any], *, max_n: int) -> Body:
    """Validate a (merged) request body for its endpoint. Raises RowError."""
    model = ChatCompletionBody if url == CHAT_URL else CompletionBody
    try:
        return model.model_validate(body, context={"max_n": max_n})
    except ValidationError as exc:
        raise RowError(ErrorCode.INVALID_REQUEST, f"invalid body: {_describe(exc)}") from None


def validate_line(
    raw: Optional[bytes],
    *,
    max_line_bytes: int,
    max_n: int,
    job_defaults: dict[str, Any],
    is_duplicate: bool = False,
) -> ValidatedRequest:
    """Check one line. Raises RowError (with the custom_id attached when readable)."""
    parsed = parse_json_line(raw, max_line_bytes)
    if not isinstance(parsed, dict):
        raise RowError(ErrorCode.INVALID_REQUEST, "line must be a JSON object")
    custom_id = readable_custom_id(parsed)
    if custom_id is None:
        raise RowError(ErrorCode.MISSING_CUSTOM_ID, "custom_id must be a non-empty string")
    try:
        if is_duplicate:
            raise RowError(
                ErrorCode.DUPLICATE_CUSTOM_ID,
                f"custom_id {custom_id!r} appears earlier in the input; the first one is used",
            )
        try:
            line = BatchInputLine.model_validate(parsed)
        except ValidationError as exc:
            raise RowError(ErrorCode.INVALID_REQUEST, _describe(exc)) from None
        if line.url not in SUPPORTED_URLS:
            raise RowError(
                ErrorCode.INVALID_REQUEST,
                f"unsupported url {line.url!r}; use {CHAT_URL} or {COMPLETIONS_URL}",
            )
        merged = {**job_defaults, **line.body}
        return ValidatedRequest(custom_id, line.url, validate_body(line.url, merged, max_n=max_n))
    except RowError as error:
        error.custom_id = custom_id
        raise


def scan_custom_ids(batch: pa.Table, *, max_line_bytes: int) -> pa.Table:
    """Ray Data UDF of the input scan: which custom_id each line claims, and which lines
    are blank. The scan runs before the main pass so that "the first occurrence wins"
    holds whatever order the parallel main pass reaches the lines in."""
    custom_ids, blanks = [], []
    for raw in column(batch, "raw"):
        blank = is_blank(raw)
        custom_id = None
        if not blank:
            try:
                custom_id = readable_custom_id(parse_json_line(raw, max_line_bytes))
            except RowError:
                pass
        custom_ids.append(custom_id)
        blanks.append(blank)
    return pa.Table.from_pydict(
        {
            "shard": column(batch, "shard"),
            "line": column(batch, "line"),
            "custom_id": custom_ids,
            "blank": blanks,
        },
        schema=SCAN_SCHEMA,
    )
