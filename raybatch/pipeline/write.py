"""Stage 6 — write: commit output lines in atomic parts, enforce the output cap, keep
the job's counters, and publish `results.jsonl` / `errors.jsonl`.

Layout under the output location:

    results.jsonl, errors.jsonl        published from the committed parts at the end
    _raybatch/parts/<seq>-<run>.{results,errors}.jsonl    part data
    _raybatch/commits/<seq>.json       commit record: which (shard, line)s the part holds
    _raybatch/progress.json            jobProgress, committed bytes, cap state
    _raybatch/engine-failures/*.json   rows in flight when an engine failed (pipeline/engine_failures.py)

A part counts only once its commit record exists, and the record is written after the
part's data, so a crash at any point leaves either a whole part or an ignored orphan.
The writer skips every (shard, line) already committed or buffered, so a retried task or
a re-run never writes a line twice.
"""

from __future__ import annotations

import itertools
import os
import time
import uuid
from typing import Iterator, Optional

import pyarrow as pa
from pydantic import BaseModel, Field

from raybatch import faults
from raybatch.pipeline.read import LineSet
from raybatch.pipeline.rows import column
from raybatch.protocol import CamelModel, JobProgress
from raybatch.storage import Location, retrying

STATE_DIR = "_raybatch"
PARTS_DIR = f"{STATE_DIR}/parts"
COMMITS_DIR = f"{STATE_DIR}/commits"
PROGRESS_FILE = f"{STATE_DIR}/progress.json"
RESULTS_FILE = "results.jsonl"
ERRORS_FILE = "errors.jsonl"


class PartCommit(BaseModel):
    """The record that makes a part count."""

    seq: int
    results_file: Optional[str]
    errors_file: Optional[str]
    lines: dict[str, list[tuple[int, int]]] = Field(
        description="Per shard, the inclusive ranges of line numbers in this part."
    )
    error_lines: dict[str, list[tuple[int, int]]] = Field(
        default_factory=dict, description="The subset of `lines` that are error rows."
    )
    results: int
    errors: int
    bytes: int
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    committed_at: Optional[float] = Field(
        None, description="Wall-clock time (epoch seconds) just before the record was "
        "written: every line in the part was answered before it, so an audit can prove "
        "no committed line was sent to an engine again. None in records of older versions."
    )


class OutputStatus(CamelModel):
    progress: JobProgress
    committed_bytes: int
    cap_reached: bool


def _ranges(lines: list[int]) -> list[tuple[int, int]]:
    ranges: list[tuple[int, int]] = []
    for line in sorted(lines):
        if ranges and ranges[-1][1] == line - 1:
            ranges[-1] = (ranges[-1][0], line)
        else:
            ranges.append((line, line))
    return ranges


def load_commits(location: Location) -> list[PartCommit]:
    records = [
        PartCommit.model_validate_json(location.read_bytes(f"{COMMITS_DIR}/{name}"))
        for name in location.list(COMMITS_DIR)
        if name.endswith(".json")
    ]
    return sorted(records, key=lambda r: r.seq)


def _numbers(ranges) -> Iterator[int]:
    """Every line number in a list of inclusive (first, last) ranges."""
    return itertools.chain.from_iterable(range(first, last + 1) for first, last in ranges)


def committed_lines(commits: list[PartCommit], into: Optional[dict[str, LineSet]] = None) -> dict[str, LineSet]:
    done: dict[str, LineSet] = {} if into is None else into
    for record in commits:
        for shard, ranges in record.lines.items():
            line_set = done.setdefault(shard, LineSet())
            for line in _numbers(ranges):
                line_set.add(line)
    return done


def succeeded_lines(commits: list[PartCommit], into: dict[str, LineSet]) -> dict[str, LineSet]:
    """Add the lines these commits answered successfully (not error rows) to `into`."""
    for record in commits:
        for shard, ranges in record.lines.items():
            failed = set(_numbers(record.error_lines.get(shard, ())))
            line_set = into.setdefault(shard, LineSet())
            for line in _numbers(ranges):
                if line not in failed:
                    line_set.add(line)
    return into


def progress_of(commits: list[PartCommit], total_input_requests: int) -> JobProgress:
    results = sum(r.results for r in commits)
    errors = sum(r.errors for r in commits)
    processed = results + errors
    return JobProgress(
        # Whole percent, floored: 100 only when every line is in a file.
        percent=100 * processed // total_input_requests if total_input_requests else 100,
        total_input_requests=total_input_requests,
        total_processed_requests=processed,
        successfully_processed_requests=results,
        failed_requests=errors,
        output_rows=processed,
        input_tokens=sum(r.prompt_tokens for r in commits),
        output_tokens=sum(r.completion_tokens for r in commits),
        cached_input_token_count=sum(r.cached_tokens for r in commits),
    )


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
        total_input_requests: int,
    ):
        self._out = Location(output_url)
        self._cap_bytes = cap_bytes
        self._part_max_rows = part_max_rows
        self._part_max_bytes = part_max_bytes
        self._part_max_seconds = part_max_seconds
        self._total = total_input_requests
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
        self._write_progress()

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
        if time.monotonic() - self._last_commit >= self._part_max_seconds:
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
        self._seq = seq
        self._commits.append(record)
        self._committed_bytes += size
        for shard, numbers in lines.items():
            line_set = self._done.setdefault(shard, LineSet())
            for number in numbers:
                line_set.add(number)

    def _write_progress(self) -> None:
        self._out.write_atomic(PROGRESS_FILE, self.status().model_dump_json(by_alias=True).encode())


def publish_files(location: Location) -> None:
    """Write results.jsonl and errors.jsonl from every committed part, in commit order.

    Idempotent: each call rebuilds both files whole from the commit records, so a
    re-run or a resumed run publishes every committed line exactly once.
    """
    commits = load_commits(location)
    for target, attribute in ((RESULTS_FILE, "results_file"), (ERRORS_FILE, "errors_file")):

        def publish_once(target: str = target, attribute: str = attribute) -> None:
            with location.open_atomic_writer(target) as writer:
                for record in commits:
                    part = getattr(record, attribute)
                    if part:
                        writer.write(location.read_bytes(part))

        # A streamed write is not retried inside the writer (see AtomicWriter), so a
        # transient failure while uploading or closing is retried here, whole: a failed
        # attempt published nothing, and the next one writes the same bytes again.
        retrying("publish", location.where(target), publish_once)
