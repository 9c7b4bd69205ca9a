"""The pool's fair queue (raybatch/engines/fair_queue.py): accounts share by weight, an
account's jobs share its turn, retried rows go first, ended jobs leave nothing behind."""

from __future__ import annotations

from collections import Counter

import pytest

from raybatch.engines.fair_queue import FairQueue


def drain(queue: FairQueue, count: int) -> list[tuple[str, str, int]]:
    return [queue.pop() for _ in range(count)]


def test_two_accounts_alternate_whatever_their_job_counts():
    queue = FairQueue()
    for job in range(50):  # one account with 50 jobs of 10 rows
        for row in range(10):
            queue.push("big", f"big-{job}", row)
    for row in range(100):  # another with one job
        queue.push("small", "small-0", row)
    taken = drain(queue, 200)
    assert Counter(account for account, _, _ in taken) == {"big": 100, "small": 100}
    # Strictly alternating: the small account is never more than one row behind.
    assert [account for account, _, _ in taken[:6]] == ["big", "small"] * 3


def test_an_accounts_jobs_take_turns_within_its_share():
    queue = FairQueue()
    for job in ("a", "b", "c"):
        for row in range(4):
            queue.push("acme", job, row)
    assert [job for _, job, _ in drain(queue, 6)] == ["a", "b", "c", "a", "b", "c"]


def test_weights_give_proportional_shares():
    queue = FairQueue()
    queue.set_weight("gold", 3)
    for row in range(300):
        queue.push("gold", "g", row)
        queue.push("basic", "b", row)
    taken = Counter(account for account, _, _ in drain(queue, 200))
    assert taken == {"gold": 150, "basic": 50}


def test_a_fractional_weight_waits_its_turns():
    queue = FairQueue()
    queue.set_weight("slow", 0.5)
    for row in range(100):
        queue.push("slow", "s", row)
        queue.push("normal", "n", row)
    taken = Counter(account for account, _, _ in drain(queue, 90))
    assert taken == {"normal": 60, "slow": 30}


def test_rows_keep_their_order_and_retried_rows_go_first():
    queue = FairQueue()
    for row in range(3):
        queue.push("acme", "job", row)
    assert queue.pop() == ("acme", "job", 0)
    queue.push("acme", "job", 0, front=True)  # back from a failed replica
    assert [row for _, _, row in drain(queue, 3)] == [0, 1, 2]
    assert queue.pop() is None and len(queue) == 0


def test_removing_a_job_takes_only_its_rows():
    queue = FairQueue()
    for row in range(3):
        queue.push("acme", "ended", row)
        queue.push("acme", "other", row)
        queue.push("globex", "theirs", row)
    assert sorted(queue.remove_job("ended")) == [0, 1, 2]
    assert len(queue) == 6
    assert Counter(job for _, job, _ in drain(queue, 6)) == {"other": 3, "theirs": 3}


def test_an_idle_account_keeps_no_credit():
    queue = FairQueue()
    queue.set_weight("bursty", 5)
    queue.push("bursty", "j", 0)
    queue.pop()  # spends 1 of 5, then empties: its credit goes with it
    for row in range(4):
        queue.push("steady", "s", row)
        queue.push("bursty", "j", row)
    first = [account for account, _, _ in drain(queue, 2)]
    assert first == ["steady", "bursty"]  # no banked credit lets it jump ahead


def test_weights_must_be_positive():
    with pytest.raises(ValueError):
        FairQueue().set_weight("acme", 0)
