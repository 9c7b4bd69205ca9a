"""`Publisher`: the scheduler publishes a job's result files in background threads.

Publishing reads every committed part and writes results.jsonl and errors.jsonl
(`output_layout.publish_files`): seconds to minutes for a large output, and on the
scheduler's loop that time was every other job's wait: no transition, no progress copy,
no admission while one job published. Here the loop asks `published(url)` on each pass;
the first ask starts the publish in a thread, and the job keeps its state (RUNNING,
WRITING_RESULTS or CANCELLING: all stored) until a later pass finds it done and moves
it on. The thread wakes the loop when it ends.

Nothing about a publish lives only here: a scheduler that stops mid-publish leaves the
job in its stored state, and the next scheduler's pass publishes again, which finishes
the stopped one (`publish_files` is resumable and never writes a line twice).
"""

from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable

from raybatch.output_layout import publish_files
from raybatch.storage import Location

WORKERS = 2  # outputs published at once; each is mostly waiting on storage


class Publisher:
    def __init__(self, on_done: Callable[[], None], workers: int = WORKERS,
                 publish: Callable[[Location], None] = publish_files):
        self._threads = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="publish")
        self._running: dict[str, Future] = {}
        self._lock = threading.Lock()
        self._on_done = on_done
        self._publish = publish

    def published(self, output_url: str) -> bool:
        """Whether this output's files are published: False while its publish runs (the
        first call starts it), True once, when it has ended. Raises its error, once: the
        next call starts a new publish."""
        with self._lock:
            future = self._running.get(output_url)
            if future is None:
                future = self._threads.submit(self._publish, Location(output_url))
                self._running[output_url] = future
                future.add_done_callback(lambda _: self._on_done())
                return False
            if not future.done():
                return False
            del self._running[output_url]
        future.result()
        return True

    def shutdown(self) -> None:
        self._threads.shutdown(wait=False, cancel_futures=True)
