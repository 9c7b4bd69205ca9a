"""The job state machine: one table of allowed transitions, one function that applies
them. See DESIGN.md for the diagram:

    VALIDATING → PENDING → RUNNING → WRITING_RESULTS → COMPLETED
                              ├──→ EXPIRED            (time limit or output cap)
                              └──→ RE_QUEUEING → PENDING   (driver or cluster died)
    VALIDATING | PENDING | RUNNING | RE_QUEUEING → CANCELLING → CANCELLED
    any non-terminal → FAILED
"""

from __future__ import annotations

import logging

from raybatch.exceptions import IllegalTransition
from raybatch.resources import TERMINAL_STATES, BatchInferenceJob, JobState, Status, now

logger = logging.getLogger(__name__)

S = JobState
ALLOWED: dict[JobState, frozenset[JobState]] = {
    S.VALIDATING: frozenset({S.PENDING, S.CANCELLING}),
    S.PENDING: frozenset({S.RUNNING, S.CANCELLING}),
    S.RUNNING: frozenset({S.WRITING_RESULTS, S.EXPIRED, S.RE_QUEUEING, S.CANCELLING}),
    # A job that hit its time limit while publishing still publishes and completes.
    S.WRITING_RESULTS: frozenset({S.COMPLETED, S.EXPIRED}),
    S.RE_QUEUEING: frozenset({S.PENDING, S.CANCELLING}),
    S.CANCELLING: frozenset({S.CANCELLED}),
    S.COMPLETED: frozenset(),
    S.EXPIRED: frozenset(),
    S.CANCELLED: frozenset(),
    S.FAILED: frozenset(),
}
# FAILED is reachable from every state that is not terminal.
for _state in ALLOWED:
    if _state not in TERMINAL_STATES:
        ALLOWED[_state] = ALLOWED[_state] | {S.FAILED}

STATUS_CODES = {
    S.FAILED: "FAILED_PRECONDITION",
    S.CANCELLED: "CANCELLED",
    S.EXPIRED: "DEADLINE_EXCEEDED",
}


def transition(job: BatchInferenceJob, target: JobState, message: str = "") -> BatchInferenceJob:
    """`job` moved to `target`, with status set; IllegalTransition if the table forbids it.

    Returns a new record; the caller stores it. FAILED keeps the message as the reason.
    """
    if target not in ALLOWED[job.state]:
        logger.error("refused illegal transition of %s: %s → %s", job.name, job.state.value, target.value)
        raise IllegalTransition(f"{job.name}: {job.state.value} → {target.value} is not allowed")
    status = Status(code=STATUS_CODES.get(target, "OK"), message=message)
    return job.model_copy(update={"state": target, "status": status, "update_time": now()})
