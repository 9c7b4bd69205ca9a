"""Every exception raybatch raises on purpose.

    RaybatchError                 base class; never raised itself
    ├── ConfigError               a setting is wrong; fix it and run again (not recoverable)
    │   └── PrecisionNotServable  the cluster has no hardware for the asked precision
    ├── OutputConflictError       OUT already holds output of a different run (not recoverable)
    ├── IncompleteRunError        the pipeline ended with lines uncommitted (recoverable:
    │                             run again, committed lines are skipped)
    └── RowError                  one line cannot be answered; it becomes an error row

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


class OutputConflictError(RaybatchError):
    """The output location holds parts of a run with a different input or settings.

    Not recoverable: mixing them would break exactly-once output. Pick another output
    location or delete the old one.
    """


class IncompleteRunError(RaybatchError):
    """The pipeline finished but some lines were never committed.

    Recoverable: running the same job again processes exactly the missing lines.
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
