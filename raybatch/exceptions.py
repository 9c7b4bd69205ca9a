"""Every exception raybatch raises on purpose.

    RaybatchError                 base class; never raised itself
    ├── ConfigError               a setting is wrong; fix it and run again (not recoverable)
    │   ├── InputTooLarge         an input shard expands past the size limit (a gzip bomb)
    │   ├── PrecisionNotServable  the cluster has no hardware for the asked precision
    │   └── EngineStartError      the model's engine failed to start again and again
    ├── OutputConflictError       OUT already holds output of a different run (not recoverable)
    ├── IncompleteRunError        the pipeline ended with lines uncommitted (recoverable:
    │                             run again, committed lines are skipped)
    ├── StorageUnavailable        storage kept failing with transient errors after every
    │                             retry (also an OSError; recoverable: run again later)
    ├── RowError                  one line cannot be answered; it becomes an error row
    ├── EngineFailure             the engine itself is dead or hung (recoverable: the pool
    │                             replaces the replica and retries its rows; no row is blamed)
    ├── ApiRequestError           the service refused a client request (raybatch.client)
    ├── IllegalTransition         a job state change the state table forbids (a bug; refused)
    └── ApiError                  an API request is refused; carries its HTTP status
        ├── InvalidArgument       400 INVALID_ARGUMENT (bad ID, bad body, bad parameter)
        ├── FailedPrecondition    400 FAILED_PRECONDITION (resource in the wrong state)
        ├── Unauthenticated       401 (no, malformed, wrong or revoked key)
        ├── PermissionDenied      403 (an admin route asked with a non-admin key)
        ├── NotFound              404 (also: another account's resource)
        ├── AlreadyExists         409
        ├── Conflict              409 ABORTED (a concurrent change won)
        ├── PayloadTooLarge       413 RESOURCE_EXHAUSTED
        └── QuotaExceeded         429 RESOURCE_EXHAUSTED (an account quota is full)
            └── RateLimited       429 RESOURCE_EXHAUSTED with Retry-After (too many requests)

Per-line problems never escape a pipeline stage: a `RowError` is caught where it is
raised and turned into an error row, because one bad line must never fail a job.
"""

from __future__ import annotations

from typing import Optional


class RaybatchError(Exception):
    """Base class of raybatch's own errors."""


class ConfigError(RaybatchError):
    """A run or service setting is invalid. Not recoverable without a change."""


class PrecisionNotServable(ConfigError):
    """The requested precision cannot be served by the hardware in the cluster.

    Raised before any engine starts, so nothing is spent on a run that cannot work.
    """


class EngineStartError(ConfigError):
    """A model's engine failed to start `max_start_failures` times in a row (a model that
    cannot load, an engine argument vLLM refuses, too little memory, a start that hung
    past `start_timeout_seconds`). The rows waiting for it fail their job with the
    engine's last error. Not recoverable by retrying."""


class InputTooLarge(ConfigError):
    """An input shard expands past `RunConfig.max_shard_bytes` (a gzip shard counts
    decompressed). Raised by the reader before any engine starts; the run stops rather
    than decompress without end. Not recoverable: the input must be made smaller."""


class OutputConflictError(RaybatchError):
    """The output location holds parts of a run with a different input or settings.

    Not recoverable: mixing them would break exactly-once output. Pick another output
    location or delete the old one.
    """


class IncompleteRunError(RaybatchError):
    """The pipeline finished but some lines were never committed.

    Recoverable: running the same job again processes exactly the missing lines.
    """


class StorageUnavailable(RaybatchError, OSError):
    """A storage operation met only transient errors (throttling, 5xx, dropped
    connections, timeouts) until its attempts ran out (`raybatch.storage.retrying`).

    The message names the operation, the path and the last error, which is also the
    `__cause__`. Also an `OSError`, so code that handles storage I/O errors handles this
    one too. Recoverable: nothing half-written is visible, so the same job can be run
    again once the storage answers. Never retried again by an outer retry.
    """


class RowError(RaybatchError):
    """One input line cannot be answered. Becomes an error row; the job goes on.

    `code` is one of `raybatch.protocol.ErrorCode`.
    """

    def __init__(self, code: str, message: str, custom_id: Optional[str] = None):
        super().__init__(message)
        self.code = str(getattr(code, "value", code))
        self.message = message
        self.custom_id = custom_id


class EngineFailure(RaybatchError):
    """The inference engine cannot answer anything any more (dead, or hung past the
    request timeout). No row is to blame, so none becomes an error row: the engine pool
    stops that replica, starts a fresh one and sends the rows that were in flight again
    (engines/pool.py)."""


class IllegalTransition(RaybatchError):
    """A job state change that the state table does not allow. Refused and logged:
    applying it would be a silent overwrite of what really happened."""


class ApiError(RaybatchError):
    """An API request is refused. Recoverable by the caller: fix the request."""

    http_status = 500
    status = "INTERNAL"

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class InvalidArgument(ApiError):
    http_status, status = 400, "INVALID_ARGUMENT"


class FailedPrecondition(ApiError):
    http_status, status = 400, "FAILED_PRECONDITION"


class Unauthenticated(ApiError):
    http_status, status = 401, "UNAUTHENTICATED"


class PermissionDenied(ApiError):
    http_status, status = 403, "PERMISSION_DENIED"


class NotFound(ApiError):
    http_status, status = 404, "NOT_FOUND"


class AlreadyExists(ApiError):
    http_status, status = 409, "ALREADY_EXISTS"


class Conflict(ApiError):
    http_status, status = 409, "ABORTED"


class PayloadTooLarge(ApiError):
    http_status, status = 413, "RESOURCE_EXHAUSTED"


class QuotaExceeded(ApiError):
    """One of the account's quotas (datasets, stored bytes, queued jobs) is full.
    Recoverable: delete datasets or let jobs end, then ask again."""

    http_status, status = 429, "RESOURCE_EXHAUSTED"


class RateLimited(QuotaExceeded):
    """The key sent requests faster than its rate limit. Recoverable: wait
    `retry_after` seconds (the `Retry-After` header) and send again."""

    def __init__(self, message: str, retry_after: int = 1):
        super().__init__(message)
        self.retry_after = retry_after


class ApiRequestError(RaybatchError):
    """The client side of `ApiError`: the service (or a signed-URL host) refused a
    request. Carries what the server said, so a caller can branch on `.status`
    ("NOT_FOUND", ...) without parsing the message.
    """

    def __init__(self, http_status: int, status: str, message: str):
        super().__init__(f"{http_status} {status}: {message}")
        self.http_status = http_status
        self.status = status
        self.message = message
