"""The state table, every pair of states: legal transitions apply, illegal ones are
refused (and nothing is changed)."""

from __future__ import annotations

import itertools

import pytest

from raybatch.exceptions import IllegalTransition
from raybatch.jobs.states import ALLOWED, transition
from raybatch.resources import TERMINAL_STATES, BatchInferenceJob, JobState

S = JobState
LEGAL = {
    (S.VALIDATING, S.PENDING), (S.VALIDATING, S.CANCELLING), (S.VALIDATING, S.FAILED),
    (S.PENDING, S.RUNNING), (S.PENDING, S.CANCELLING), (S.PENDING, S.FAILED),
    (S.RUNNING, S.WRITING_RESULTS), (S.RUNNING, S.EXPIRED), (S.RUNNING, S.RE_QUEUEING),
    (S.RUNNING, S.CANCELLING), (S.RUNNING, S.FAILED),
    (S.WRITING_RESULTS, S.COMPLETED), (S.WRITING_RESULTS, S.EXPIRED), (S.WRITING_RESULTS, S.FAILED),
    (S.RE_QUEUEING, S.PENDING), (S.RE_QUEUEING, S.CANCELLING), (S.RE_QUEUEING, S.FAILED),
    (S.CANCELLING, S.CANCELLED), (S.CANCELLING, S.FAILED),
}


def test_the_table_is_the_design():
    assert {(a, b) for a, targets in ALLOWED.items() for b in targets} == LEGAL


@pytest.mark.parametrize("source,target", list(itertools.product(JobState, JobState)))
def test_every_transition(source, target):
    job = BatchInferenceJob(name="accounts/a/batchInferenceJobs/j", state=source)
    if (source, target) in LEGAL:
        moved = transition(job, target, "why")
        assert moved.state == target and moved.status.message == "why"
        assert job.state == source  # a new record; the old one is untouched
    else:
        with pytest.raises(IllegalTransition, match=f"{source.value} → {target.value}"):
            transition(job, target)


def test_terminal_states_go_nowhere_and_failed_is_reachable_from_the_rest():
    for state in JobState:
        if state in TERMINAL_STATES:
            assert not ALLOWED[state]
        else:
            assert S.FAILED in ALLOWED[state]


def test_status_codes_of_endings():
    job = BatchInferenceJob(name="accounts/a/batchInferenceJobs/j", state=S.RUNNING)
    assert transition(job, S.FAILED, "no").status.code == "FAILED_PRECONDITION"
    assert transition(job, S.EXPIRED).status.code == "DEADLINE_EXCEEDED"
    assert transition(transition(job, S.CANCELLING), S.CANCELLED).status.code == "CANCELLED"
