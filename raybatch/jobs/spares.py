"""Spare drivers: job drivers started before the jobs that will need them.

A driver's process start and imports (Ray, Ray Data, pyarrow, the data plane) take
seconds on a small machine; a job given a spare has them behind it. A spare
(`jobs/driver.py --spare ID`) joins the cluster and waits for an assignment in storage
(`jobs/handoff.py`). The scheduler writes the assignment first and then the job's record
that names the spare, and the spare runs the job only once the record names it: a
scheduler that stops between the two leaves an idle spare, never a job run by a driver
its record does not name. From then on a spare is the job's driver like any other.

A spare outlives its job: once the job's outcome is read, the scheduler takes it back as
a ready spare (`give_back`, first in line: it has nothing left to import, and its
tokenizers are loaded), and it waits for the next assignment. The scheduler keeps
`count` idle spares: one given back beyond that is stopped.

A spare's start is itself seconds of CPU: a Python process importing all of that, and
Ray's job supervisor beside it. On a small machine that CPU comes out of the engines
(measured: two spares started beside two running jobs took 29 s to connect, and held
one of the jobs back). So the scheduler starts spares only while no job runs (`keep`);
while jobs run, the spares come back as their jobs end. A job started when none is
ready gets a driver of its own, which exits after its job.
"""

from __future__ import annotations

import logging
import uuid
from typing import Optional

from raybatch.jobs.driver_control import DriverControl
from raybatch.jobs.handoff import SPARE_DRIVER_PREFIX, DriverAssignment, read_assignment, write_assignment
from raybatch.storage import Location

logger = logging.getLogger(__name__)

class SpareDrivers:
    def __init__(self, drivers: DriverControl, store: Location, storage_url: str, count: int, idle_seconds: float):
        self._drivers = drivers
        self._store = store
        self._storage_url = storage_url
        self._count = count
        self._idle_seconds = idle_seconds
        self._ready: list[str] = []
        self._looked = False  # whether `keep` has stopped an earlier scheduler's idle spares

    def keep(self) -> None:
        """Keep `count` spares started. The first call stops the idle spares an earlier
        scheduler left (their ids died with it); spares given a job run on, and come
        back to this scheduler when it ends (`give_back`)."""
        try:
            if not self._looked:
                for driver_id in self._drivers.live_drivers(SPARE_DRIVER_PREFIX):
                    if driver_id not in self._ready and read_assignment(self._store, driver_id) is None:
                        self._drivers.stop(driver_id, wait_seconds=0)
                self._looked = True
            self._ready = [d for d in self._ready if self._drivers.status(d).alive]
            while len(self._ready) < self._count:
                driver_id = f"{SPARE_DRIVER_PREFIX}{uuid.uuid4().hex[:12]}"
                self._drivers.submit_spare(driver_id, storage=self._storage_url, idle_seconds=self._idle_seconds)
                self._ready.append(driver_id)
        except Exception:  # a job without a spare starts a driver of its own
            logger.exception("cannot start a spare driver")

    def give_back(self, driver_id: Optional[str]) -> None:
        """A spare whose job has ended waits for its next (jobs/driver.py): first in line,
        or stopped when `count` spares are ready without it. Any other driver exits by
        itself."""
        if not (driver_id or "").startswith(SPARE_DRIVER_PREFIX) or driver_id in self._ready:
            return
        self._ready.insert(0, driver_id)
        while len(self._ready) > self._count:
            surplus = self._ready.pop()  # the newest start: it may still be importing
            try:
                self._drivers.stop(surplus, wait_seconds=0)
            except Exception:  # it exits by itself after its idle time
                logger.exception("cannot stop spare driver %s", surplus)

    def take(self, assignment: DriverAssignment) -> Optional[str]:
        """Give the attempt to a spare: its driver id, or None when none is up. The
        caller must then name that id in the job's record, or the spare stays idle."""
        while self._ready:
            driver_id = self._ready.pop(0)
            # One that died while idle (killed, its node lost) would cost the job an attempt.
            if self._drivers.status(driver_id).alive:
                write_assignment(self._store, driver_id, assignment)
                return driver_id
        return None
