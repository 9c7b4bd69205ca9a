"""Query parameters, as Fireworks' gateway takes them: each under its camelCase name or
its snake_case one (`pageSize` or `page_size`: the proto field name works as well as its
JSON name). A parameter a route does not take, one given twice, or one that does not
parse is a 400: a silently ignored `page_size` or `read_mask` returns the wrong page or
the wrong fields with no sign of it."""

from __future__ import annotations

import re
from typing import Any

from starlette.requests import Request

from raybatch.exceptions import InvalidArgument

BOOLEANS = {"true": True, "1": True, "false": False, "0": False}


def _camel(name: str) -> str:
    return re.sub(r"_([a-z])", lambda m: m.group(1).upper(), name)


def query_params(request: Request, **accepted: type) -> dict[str, Any]:
    """The request's query parameters among `accepted` (camelCase name → int, bool or
    str), parsed, under their camelCase names; a parameter not given is None."""
    found: dict[str, Any] = {name: None for name in accepted}
    seen: dict[str, str] = {}
    for given, raw in request.query_params.multi_items():
        name = _camel(given)
        if name not in accepted:
            takes = ", ".join(accepted) or "no query parameters"
            raise InvalidArgument(f"unknown query parameter {given!r}; this route takes {takes} "
                                  "(or their snake_case forms)")
        if name in seen:
            raise InvalidArgument(f"query parameter {name!r} is given twice ({seen[name]!r} and {given!r})")
        seen[name] = given
        found[name] = _parse(given, raw, accepted[name])
    return found


def _parse(given: str, raw: str, kind: type) -> Any:
    if kind is bool:
        if raw.lower() not in BOOLEANS:
            raise InvalidArgument(f"query parameter {given!r} must be true or false, not {raw!r}")
        return BOOLEANS[raw.lower()]
    if kind is int:
        try:
            return int(raw)
        except ValueError:
            raise InvalidArgument(f"query parameter {given!r} must be an integer, not {raw!r}") from None
    return raw


