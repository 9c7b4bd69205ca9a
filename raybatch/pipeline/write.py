"""Stage 6 — write: commit output lines in atomic parts, enforce the output cap and keep
the job's counters. The folder this writes (parts, commit records, progress) and how it
is read and published are defined in `raybatch/output_layout.py`.
"""

from __future__ import annotations

import collections
import os
import threading
import time
import uuid
from typing import Any, Callable, Optional

import pyarrow as pa

from raybatch import faults, metrics
from raybatch.output_layout import (
    COMMITS_DIR,
    PARTS_DIR,
    PROGRESS_FILE,
    OutputStatus,
    PartCommit,
    ProgressTotals,
    committed_lines,
    load_commits,
)
from raybatch.pipeline.read import LineSet
from raybatch.pipeline.rows import column
from raybatch.storage import Location


def _ranges(lines: list[int]) -> list[tuple[int, int]]:
    ranges: list[tuple[int, int]] = []
    for line in sorted(lines):
        if ranges and ranges[-1][1] == line - 1:
            ranges[-1] = (ranges[-1][0], line)
        else:
            ranges.append((line, line))
    return ranges


class OutputWriter:
    """Run as a Ray actor (`ray.remote(OutputWriter)`); one per job."""

    def __init__(
        self,
        output_url: str,
        *,
        cap_bytes: int,
        part_max_rows: int,
        part_max_bytes: int,
        part_max_seconds: float,
        part_quiet_seconds: Optional[float] = None,
        total_input_requests: Optional[int] = None,
        metric_labels: Optional[dict[str, str]] = None,
    ):
        """`total_input_requests` may come later, through `begin`: a run creates its
        writer before it scans the input, so that the actor's process starts meanwhile.
        `part_quiet_seconds`: rows still held that long after the last append are
        committed by a timer (None: only appends and `flush` commit)."""
        self._out = Location(output_url)
        self._cap_bytes = cap_bytes
        self._part_max_rows = part_max_rows
        self._part_max_bytes = part_max_bytes
        self._part_max_seconds = part_max_seconds
        self._part_quiet_seconds = part_quiet_seconds
        self._total = total_input_requests
        self._metric_labels = metric_labels or metrics.job_labels(None, "local")
        self._run = uuid.uuid4().hex[:8]
        commits = load_commits(self._out)
        self._done = committed_lines(commits)
        self._seq = max((r.seq for r in commits), default=0)
        self._first_seq = self._seq
        # Running: each commit adds its record (not a sum over every record per status).
        self._totals = ProgressTotals(commits)
        self._buffer: list[tuple] = []
        self._buffered: set[tuple[str, int]] = set()
        self._buffer_bytes = 0
        self._last_commit = time.monotonic()
        self._last_append = time.monotonic()
        self._cap_reached = False
        # The quiet timer commits from its own thread: one lock keeps commits in order
        # with the actor's calls. At most one timer is pending.
        self._lock = threading.Lock()
        self._quiet_timer: Optional[threading.Timer] = None
        self._quiet_failure: Optional[Exception] = None  # raised by the next call
        if total_input_requests is not None:
            self._write_progress()

    def begin(self, total_input_requests: int) -> OutputStatus:
        with self._lock:
            self._raise_quiet_failure()
            self._total = total_input_requests
            self._write_progress()
            return self.status()

    def append(self, table: pa.Table) -> OutputStatus:
        with self._lock:
            self._raise_quiet_failure()
            self._last_append = time.monotonic()
            self._append(table)
            if self._buffer and self._part_quiet_seconds is not None and self._quiet_timer is None:
                self._start_quiet_timer(self._part_quiet_seconds)
            return self.status()

    def _append(self, table: pa.Table) -> None:
        rows = zip(
            column(table, "shard"),
            column(table, "line"),
            column(table, "is_error"),
            column(table, "output"),
            column(table, "prompt_tokens"),
            column(table, "completion_tokens"),
            column(table, "cached_tokens"),
        )
        for row in rows:
            if self._cap_reached:
                break
            shard, line = row[0], row[1]
            if (shard, line) in self._buffered or line in self._done.get(shard, ()):
                continue
            encoded = row[3].encode("utf-8") + b"\n"
            self._buffer.append((*row[:3], encoded, *row[4:]))
            self._buffered.add((shard, line))
            self._buffer_bytes += len(encoded)
            if len(self._buffer) >= self._part_max_rows or self._buffer_bytes >= self._part_max_bytes:
                self._commit()
        # The first rows commit at once: a new job (or attempt) shows progress with its
        # first answers, not `part_max_seconds` later. One small part more per attempt.
        first = self._seq == self._first_seq and self._buffer
        if first or time.monotonic() - self._last_commit >= self._part_max_seconds:
            self._commit()

    def flush(self) -> OutputStatus:
        with self._lock:
            self._raise_quiet_failure()
            self._commit()
            return self.status()

    def _raise_quiet_failure(self) -> None:
        """A commit that failed in the timer's thread fails the writer's next call, as
        one in that call would have: its rows left the buffer uncommitted, and the run
        must not end as if they were written (the next attempt answers them)."""
        if self._quiet_failure is not None:
            raise self._quiet_failure

    def _start_quiet_timer(self, seconds: float) -> None:
        self._quiet_timer = threading.Timer(seconds, self._commit_when_quiet)
        self._quiet_timer.daemon = True
        self._quiet_timer.start()

    def _commit_when_quiet(self) -> None:
        """Commit the rows held once appends stop. Why: answers come in bursts (rows that
        started together end together), and `part_max_seconds` alone commits only the
        burst's first append at once; the rest waited for the next burst, or the job's
        end (docs/performance.md). A steady stream never falls quiet and commits every
        `part_max_seconds` as before."""
        with self._lock:
            self._quiet_timer = None
            if not self._buffer or self._quiet_failure is not None:
                return
            remaining = self._last_append + self._part_quiet_seconds - time.monotonic()
            if remaining > 0:
                self._start_quiet_timer(remaining)
                return
            try:
                self._commit()
            except Exception as exc:  # noqa: BLE001 - no caller in this thread: kept for the next call
                self._quiet_failure = exc

    def status(self) -> OutputStatus:
        return OutputStatus(
            progress=self._totals.progress(self._total),
            committed_bytes=self._totals.bytes,
            cap_reached=self._cap_reached,
        )

    def _commit(self) -> None:
        self._last_commit = time.monotonic()
        rows, self._buffer, self._buffered, self._buffer_bytes = self._buffer, [], set(), 0
        room = self._cap_bytes - self._totals.bytes
        kept, size = [], 0
        for row in rows:
            if size + len(row[3]) > room:
                # Whole lines only: stop at the last line that fits under the cap.
                self._cap_reached = True
                break
            kept.append(row)
            size += len(row[3])
        if kept:
            self._commit_part(kept, size)
        self._write_progress()

    def _commit_part(self, rows: list[tuple], size: int) -> None:
        started = time.monotonic()
        seq = self._seq + 1
        stem = f"{PARTS_DIR}/{seq:08d}-{self._run}"
        results = b"".join(r[3] for r in rows if not r[2])
        errors = b"".join(r[3] for r in rows if r[2])
        results_file = f"{stem}.results.jsonl" if results else None
        errors_file = f"{stem}.errors.jsonl" if errors else None
        for name, data in ((results_file, results), (errors_file, errors)):
            if name:
                self._out.write_atomic(name, data)
        lines: dict[str, list[int]] = {}
        error_lines: dict[str, list[int]] = {}
        for row in rows:
            lines.setdefault(row[0], []).append(row[1])
            if row[2]:
                error_lines.setdefault(row[0], []).append(row[1])
        record = PartCommit(
            seq=seq,
            results_file=results_file,
            errors_file=errors_file,
            lines={shard: _ranges(numbers) for shard, numbers in lines.items()},
            error_lines={shard: _ranges(numbers) for shard, numbers in error_lines.items()},
            results=sum(1 for r in rows if not r[2]),
            errors=sum(1 for r in rows if r[2]),
            bytes=size,
            prompt_tokens=sum(r[4] for r in rows),
            completion_tokens=sum(r[5] for r in rows),
            cached_tokens=sum(r[6] for r in rows),
            committed_at=time.time(),
        )
        if faults.fires("writer.crash", seq - self._first_seq):
            os._exit(1)  # the reliability tests' crash between a part and its commit
        # The commit point: until this record exists the part does not count.
        self._out.write_atomic(f"{COMMITS_DIR}/{seq:08d}.json", record.model_dump_json().encode())
        metrics.record_commit(self._metric_labels, record, [r[3] for r in rows if r[2]], time.monotonic() - started)
        self._seq = seq
        self._totals.add(record)
        for shard, numbers in lines.items():
            line_set = self._done.setdefault(shard, LineSet())
            for number in numbers:
                line_set.add(number)

    def _write_progress(self) -> None:
        self._out.write_atomic(PROGRESS_FILE, self.status().model_dump_json(by_alias=True).encode())


class WriterFeed:
    """The driver's side of the writer: finished batches go to the writer in appends of
    about `append_rows` rows, with up to `in_flight` appends sent and not yet answered,
    so that the driver goes on with the pipeline while the writer commits.

    Why: one append per engine batch (16 rows by default) was one actor call, and a wait
    for the writer's commit, every 16 rows. Rows are held here only while batches come
    faster than one per `append_seconds` (a slow stream sends each batch at once, so
    commits are not delayed), and nothing is lost by holding them: rows the writer has
    not committed are not committed wherever they wait, and the next run answers them
    again. The bound keeps the writer's queue (and memory) fixed: when it is full the
    driver waits for the oldest append, as it waited for each one before. The writer
    answers appends in the order they were sent (an actor runs one call at a time), so
    the last status received is the newest.

    `send(table)` starts an append and returns a handle; `wait(handle)` returns its
    OutputStatus (Ray: `writer.append.remote` and `ray.get`).
    """

    def __init__(
        self,
        send: Callable[[pa.Table], Any],
        wait: Callable[[Any], OutputStatus],
        *,
        append_rows: int = 1024,
        append_seconds: float = 0.1,
        in_flight: int = 2,
    ):
        self._send, self._wait = send, wait
        self._append_rows, self._append_seconds, self._in_flight = append_rows, append_seconds, in_flight
        self._held: list[pa.Table] = []
        self._held_rows = 0
        self._last_send = float("-inf")  # the first batch goes at once: the first commit
        self._sent: collections.deque = collections.deque()
        self.status: Optional[OutputStatus] = None

    def add(self, table: pa.Table) -> Optional[OutputStatus]:
        """Take a finished batch. Returns a status when the writer answered one meanwhile."""
        self._held.append(table)
        self._held_rows += table.num_rows
        if self._held_rows >= self._append_rows or time.monotonic() - self._last_send >= self._append_seconds:
            self._send_held()
        received = None
        while len(self._sent) > self._in_flight:
            received = self.status = self._wait(self._sent.popleft())
        return received

    def drain(self) -> Optional[OutputStatus]:
        """Send what is held and wait for every append; the last status."""
        self._send_held()
        while self._sent:
            self.status = self._wait(self._sent.popleft())
        return self.status

    def _send_held(self) -> None:
        if not self._held:
            return
        table = self._held[0] if len(self._held) == 1 else pa.concat_tables(self._held)
        self._sent.append(self._send(table))
        self._last_send = time.monotonic()
        self._held, self._held_rows = [], 0
