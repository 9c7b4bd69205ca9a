"""The list routes' paging (`pageSize`, `pageToken`), and their `filter` and `orderBy`
over each list's fields (parsed in `filtering`)."""

from __future__ import annotations

import base64
from typing import Optional

from raybatch.api.filtering import Field, Kind, ordered, parse_filter, parse_order
from raybatch.exceptions import InvalidArgument
from raybatch.resources import DatasetState, JobState

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


# Fireworks' JobState values. Naming one that raybatch never reaches (CREATING, PAUSED,
# ...) is a valid filter that matches nothing, as it would on Fireworks for an account
# with no such job.
FIREWORKS_JOB_STATES = frozenset({s.value for s in JobState} | {
    "JOB_STATE_UNSPECIFIED", "JOB_STATE_CREATING", "JOB_STATE_DELETING", "JOB_STATE_DELETING_CLEANING_UP",
    "JOB_STATE_CREATING_INPUT_DATASET", "JOB_STATE_IDLE", "JOB_STATE_EARLY_STOPPED", "JOB_STATE_PAUSED",
})
FIREWORKS_DATASET_STATES = frozenset({s.value for s in DatasetState} | {"STATE_UNSPECIFIED"})

_COMMON = {
    "name": Field(Kind.REFERENCE),
    "displayName": Field(Kind.STRING),
    "createTime": Field(Kind.TIME),
    "updateTime": Field(Kind.TIME),
    "createdBy": Field(Kind.STRING),
}
JOB_FIELDS = {
    **_COMMON,
    "state": Field(Kind.ENUM, FIREWORKS_JOB_STATES, prefix="JOB_STATE_"),
    "model": Field(Kind.STRING),
    "inputDatasetId": Field(Kind.REFERENCE),
    "outputDatasetId": Field(Kind.REFERENCE),
    "continuedFromJobName": Field(Kind.REFERENCE),
}
DATASET_FIELDS = {
    **_COMMON,
    "state": Field(Kind.ENUM, FIREWORKS_DATASET_STATES),
    "format": Field(Kind.STRING),
    "sourceJobName": Field(Kind.REFERENCE),
}
DEFAULT_ORDER = [("create_time", False)]


def listed(records: list, filter_text: Optional[str], order_text: Optional[str], fields: dict[str, Field]) -> list:
    """`records` that pass the filter, in the asked order (oldest first by default). Both
    are parsed before anything is filtered: a bad expression is a 400 whatever the list holds."""
    predicate = parse_filter(filter_text, fields)
    order = parse_order(order_text, fields)
    kept = records if predicate is None else [r for r in records if predicate(r)]
    return ordered(kept, order, DEFAULT_ORDER)
