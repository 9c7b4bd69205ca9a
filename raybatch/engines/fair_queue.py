"""`FairQueue`: the rows waiting for one model's replicas, handed out by weighted fair
share — deficit round robin over accounts, then round robin over each account's jobs.

A replica takes its next row from here whenever one of its slots frees, so fairness is
decided at the last moment, over exactly the rows that are waiting: two accounts with
rows queued get about the same share of the engine whatever their job counts, and an
account with 50 jobs cannot starve one with one job. Pure Python, no Ray: unit-tested.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from typing import AbstractSet, Generic, Hashable, Iterator, Optional, TypeVar

Item = TypeVar("Item")


class _Account(Generic[Item]):
    def __init__(self, weight: float) -> None:
        self.weight = weight
        self.deficit = 0.0
        self.jobs: "OrderedDict[Hashable, deque[Item]]" = OrderedDict()  # round-robin order

    def pop(self) -> tuple[Hashable, Item]:
        job, rows = next(iter(self.jobs.items()))
        item = rows.popleft()
        self.jobs.move_to_end(job)  # the next row of this account comes from its next job
        if not rows:
            del self.jobs[job]
        return job, item


class FairQueue(Generic[Item]):
    """Rows queued per (account, job). `pop` returns the next row by fair share.

    Deficit round robin: each account in turn earns `weight` rows of credit and spends
    one per row taken; an account whose turn comes with no credit left is passed over
    until it earns more. With equal weights this is plain round robin over accounts.
    """

    def __init__(self) -> None:
        self._accounts: "OrderedDict[str, _Account[Item]]" = OrderedDict()
        self._weights: dict[str, float] = {}
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def set_weight(self, account: str, weight: float) -> None:
        if weight <= 0:
            raise ValueError("an account's weight must be positive")
        self._weights[account] = weight
        if account in self._accounts:
            self._accounts[account].weight = weight

    def push(self, account: str, job: Hashable, item: Item, front: bool = False) -> None:
        """Queue a row. `front`: a row coming back from a failed replica goes first
        within its job, so retried rows are not starved by the job's newer ones."""
        queue = self._accounts.get(account)
        if queue is None:
            queue = self._accounts[account] = _Account(self._weights.get(account, 1.0))
        rows = queue.jobs.get(job)
        if rows is None:
            rows = queue.jobs[job] = deque()
        rows.appendleft(item) if front else rows.append(item)
        self._size += 1

    def weight(self, account: str) -> float:
        return self._weights.get(account, 1.0)

    def accounts(self) -> set[str]:
        """The accounts with rows waiting."""
        return set(self._accounts)

    def pop(self, skip: AbstractSet[str] = frozenset()) -> Optional[tuple[str, Hashable, Item]]:
        """The next (account, job, row), or None when nothing waits. Accounts in `skip`
        are passed over (to the back of the round), keeping their credit."""
        passed = 0
        while len(self._accounts) > passed:
            account, queue = next(iter(self._accounts.items()))
            if account in skip:
                self._accounts.move_to_end(account)
                passed += 1
                continue
            passed = 0
            if queue.deficit < 1:
                queue.deficit += queue.weight
                if queue.deficit < 1:  # a weight below 1 waits several rounds
                    self._accounts.move_to_end(account)
                    continue
            queue.deficit -= 1
            job, item = queue.pop()
            self._size -= 1
            if not queue.jobs:
                del self._accounts[account]  # an idle account keeps no credit
            elif queue.deficit < 1:
                self._accounts.move_to_end(account)
            return account, job, item
        return None

    def remove_job(self, job: Hashable) -> list[Item]:
        """Take every queued row of a job out (its job was cancelled or ended)."""
        removed: list[Item] = []
        for account in list(self._accounts):
            queue = self._accounts[account]
            rows = queue.jobs.pop(job, None)
            if rows:
                removed.extend(rows)
            if not queue.jobs:
                del self._accounts[account]
        self._size -= len(removed)
        return removed

    def __iter__(self) -> Iterator[Item]:
        for queue in self._accounts.values():
            for rows in queue.jobs.values():
                yield from rows
