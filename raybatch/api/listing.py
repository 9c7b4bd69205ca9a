"""The list routes' query parameters: paging (`pageSize`, `pageToken`), and for jobs
`filter` (by state) and `orderBy` (createTime)."""

from __future__ import annotations

import base64
from typing import Optional

from raybatch.exceptions import InvalidArgument
from raybatch.resources import JobState

MAX_PAGE_SIZE, DEFAULT_PAGE_SIZE = 200, 50


def page_of(items: list, page_size: Optional[int], page_token: Optional[str]) -> tuple[list, str]:
    """One page of `items` and the token of the next ("" on the last). The token is
    the next item's index: a listing that changes between pages may skip or repeat."""
    size = min(page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
    if size < 1:
        raise InvalidArgument("pageSize must be positive")
    start = 0
    if page_token:
        try:
            start = int(base64.urlsafe_b64decode(page_token.encode()).decode())
        except ValueError:
            raise InvalidArgument("invalid pageToken") from None
        if start < 0 or start > len(items):
            raise InvalidArgument("invalid pageToken")
    end = start + size
    token = base64.urlsafe_b64encode(str(end).encode()).decode() if end < len(items) else ""
    return items[start:end], token


def parse_filter(text: Optional[str]) -> Optional[set[str]]:
    """The part of AIP-160 that jobs need: `state = X` or-ed together (`state=X OR state=Y`)."""
    if not text or not text.strip():
        return None
    states = set()
    for term in text.split(" OR "):
        field, _, value = term.partition("=")
        value = value.strip().strip('"')
        if field.strip() != "state" or value not in {s.value for s in JobState}:
            raise InvalidArgument(f"unsupported filter {text!r}: use state=JOB_STATE_... (OR state=...)")
        states.add(value)
    return states


def parse_order(text: Optional[str]) -> bool:
    """orderBy on createTime: True for descending."""
    if not text or not text.strip():
        return False
    field, _, direction = text.strip().partition(" ")
    if field not in ("createTime", "create_time", "created_time") or direction.strip() not in ("", "asc", "desc"):
        raise InvalidArgument(f"unsupported orderBy {text!r}: use 'createTime' or 'createTime desc'")
    return direction.strip() == "desc"
