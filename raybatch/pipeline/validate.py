"""Stage 2 — validate: turn each raw line into a request or an error row.

Every check here is per line and pure, so a bad line costs one error row and nothing
else. The order of the checks decides which code a line with several faults gets:
size, encoding, JSON, shape, custom_id, duplicate, url, body.

Parsing also refuses JSON that Python reads but later stages could not carry (deep
nesting, lone surrogates): such a line must fail here, as a row, rather than fail a
worker further on.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Optional, Union

import pyarrow as pa
from pydantic import ValidationError

from raybatch.exceptions import RowError
from raybatch.pipeline.read import UNREADABLE
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

# Levels of arrays and objects a line may nest, the line itself being the first. Real
# requests need a handful, a json_schema some dozens. Deeper ones would pass here and
# fail a worker later: pydantic writes JSON only ~250 levels deep and reads it ~200 (the
# engine stage reads each request back). A fixed limit also keeps the outcome apart from
# the stack depth json.loads happens to have left.
MAX_NESTING = 64
# json.loads turns an escape of a lone UTF-16 surrogate (\ud800-\udfff, unpaired) into a
# str that is no Unicode text: UTF-8 cannot encode it, so neither Arrow nor the output
# files can hold it.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
_SURROGATE = re.compile("[\ud800-\udfff]")


@dataclass
class ValidatedRequest:
    custom_id: str
    url: str
    body: Body


def is_blank(raw: Optional[bytes]) -> bool:
    return raw is not None and not raw.strip()


def _too_deep() -> RowError:
    return RowError(ErrorCode.INVALID_JSON, f"line is nested deeper than {MAX_NESTING} levels")


def _check_parsed(parsed: Any, text: str) -> None:
    """Refuse nesting past MAX_NESTING and lone surrogates. The walk goes level by level,
    without recursion, and only when the text could hold either: more than MAX_NESTING
    brackets, or a surrogate escape. Most lines hold neither and cost two counts."""
    strings = _SURROGATE_ESCAPE.search(text) is not None
    if not strings and text.count("[") + text.count("{") <= MAX_NESTING:
        return
    level, depth = ([parsed] if isinstance(parsed, (dict, list)) else []), 1
    while level:
        if depth > MAX_NESTING:
            raise _too_deep()
        below = []
        for value in level:
            for child in [*value, *value.values()] if isinstance(value, dict) else value:
                if isinstance(child, (dict, list)):
                    below.append(child)
                elif strings and isinstance(child, str) and _SURROGATE.search(child):
                    raise RowError(
                        ErrorCode.INVALID_JSON, "line holds a lone UTF-16 surrogate escape (\\ud800-\\udfff)"
                    )
        level, depth = below, depth + 1


def parse_json_line(raw: Optional[bytes], max_line_bytes: int) -> Any:
    """Decode one line. Raises RowError for an oversized, unreadable, non-UTF-8 or
    non-JSON line, and for JSON that later stages could not carry."""
    if raw is None:
        raise RowError(
            ErrorCode.LINE_TOO_LARGE, f"line is longer than the limit of {max_line_bytes} bytes"
        )
    if raw.startswith(UNREADABLE):
        raise RowError(ErrorCode.INVALID_JSON, raw[len(UNREADABLE):].decode())
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RowError(
            ErrorCode.INVALID_JSON, f"line is not valid UTF-8: {exc.reason} at byte {exc.start}"
        ) from None
    try:
        parsed = json.loads(text)
    except RecursionError:  # past ~1000 levels, before MAX_NESTING can be checked
        raise _too_deep() from None
    except json.JSONDecodeError as exc:
        raise RowError(ErrorCode.INVALID_JSON, f"line is not valid JSON: {exc}") from None
    except ValueError:  # int() refuses integers past Python's digit limit (4300)
        raise RowError(ErrorCode.INVALID_JSON, "line holds an integer with too many digits") from None
    _check_parsed(parsed, text)
    return parsed


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
