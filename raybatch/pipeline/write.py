"""Stage 6 — write: commit output lines in atomic parts, enforce the output cap and keep
the job's counters. The folder this writes (parts, commit records, progress) and how it
is read and published are defined in `raybatch/output_layout.py`.
"""

from __future__ import annotations

import os
import time
import uuid
from typing import Optional

import pyarrow as pa

from raybatch import faults, metrics
from raybatch.output_layout import (
    COMMITS_DIR,
    PARTS_DIR,
    PROGRESS_FILE,
    OutputStatus,
    PartCommit,
    committed_lines,
    load_commits,
    progress_of,
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
        total_input_requests: Optional[int] = None,
        metric_labels: Optional[dict[str, str]] = None,
    ):
        """`total_input_requests` may come later, through `begin`: a run creates its
        writer before it scans the input, so that the actor's process starts meanwhile."""
        self._out = Location(output_url)
        self._cap_bytes = cap_bytes
        self._part_max_rows = part_max_rows
        self._part_max_bytes = part_max_bytes
        self._part_max_seconds = part_max_seconds
        self._total = total_input_requests
        self._metric_labels = metric_labels or metrics.job_labels(None, "local")
        self._run = uuid.uuid4().hex[:8]
        self._commits = load_commits(self._out)
        self._done = committed_lines(self._commits)
        self._seq = max((r.seq for r in self._commits), default=0)
        self._first_seq = self._seq
        self._committed_bytes = sum(r.bytes for r in self._commits)
        self._buffer: list[tuple] = []
        self._buffered: set[tuple[str, int]] = set()
        self._buffer_bytes = 0
        self._last_commit = time.monotonic()
        self._cap_reached = False
        if total_input_requests is not None:
            self._write_progress()

    def begin(self, total_input_requests: int) -> OutputStatus:
        self._total = total_input_requests
        self._write_progress()
        return self.status()

    def append(self, table: pa.Table) -> OutputStatus:
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
        return self.status()

    def flush(self) -> OutputStatus:
        self._commit()
        return self.status()

    def status(self) -> OutputStatus:
        return OutputStatus(
            progress=progress_of(self._commits, self._total),
            committed_bytes=self._committed_bytes,
            cap_reached=self._cap_reached,
        )

    def _commit(self) -> None:
        self._last_commit = time.monotonic()
        rows, self._buffer, self._buffered, self._buffer_bytes = self._buffer, [], set(), 0
        room = self._cap_bytes - self._committed_bytes
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
        self._commits.append(record)
        self._committed_bytes += size
        for shard, numbers in lines.items():
            line_set = self._done.setdefault(shard, LineSet())
            for number in numbers:
                line_set.add(number)

    def _write_progress(self) -> None:
        self._out.write_atomic(PROGRESS_FILE, self.status().model_dump_json(by_alias=True).encode())
