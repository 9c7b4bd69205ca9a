"""The output folder's format: where a job's output location keeps its parts, commit
records and progress, and how the control plane reads them. `pipeline/write.py`'s
`OutputWriter` is the one writer of this format; the scheduler, the runner and the
tests read it through this module.

Layout under the output location:

    results.jsonl, errors.jsonl        published from the committed parts at the end
    _raybatch/parts/<seq>-<run>.{results,errors}.jsonl    part data (removed once published)
    _raybatch/published.json           which commits the published files hold (publish_files)
    _raybatch/commits/<seq>.json       commit record: which (shard, line)s the part holds
    _raybatch/progress.json            jobProgress, committed bytes, cap state
    _raybatch/run.json                 the input and settings this output belongs to (runner.py)
    _raybatch/engine-failures/*.json   rows in flight when an engine failed (engines/failures.py)

A part counts only once its commit record exists, and the record is written after the
part's data, so a crash at any point leaves either a whole part or an ignored orphan.
The writer skips every (shard, line) already committed or buffered, so a retried task or
a re-run never writes a line twice.
"""

from __future__ import annotations

import functools
import itertools
import os
import posixpath
from typing import Iterable, Iterator, Optional

from pydantic import BaseModel, Field

from raybatch import faults
from raybatch.pipeline.read import LineSet
from raybatch.protocol import CamelModel, JobProgress
from raybatch.storage import Location, retrying

STATE_DIR = "_raybatch"
PARTS_DIR = f"{STATE_DIR}/parts"
COMMITS_DIR = f"{STATE_DIR}/commits"
PROGRESS_FILE = f"{STATE_DIR}/progress.json"
RESULTS_FILE = "results.jsonl"
ERRORS_FILE = "errors.jsonl"
RUN_FILE = f"{STATE_DIR}/run.json"
PUBLISHED_FILE = f"{STATE_DIR}/published.json"
ENGINE_FAILURES_DIR = f"{STATE_DIR}/engine-failures"


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


def read_progress(location: Location) -> Optional[OutputStatus]:
    """The writer's last progress record, or None before the writer has started."""
    if not location.exists(PROGRESS_FILE):
        return None
    return OutputStatus.model_validate_json(location.read_bytes(PROGRESS_FILE))


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


class ProgressTotals:
    """The counters of jobProgress, kept running: the writer adds each record as it
    commits it, so a status costs the same at the 10th part as at the 10,000th."""

    def __init__(self, commits: Iterable[PartCommit] = ()):
        self.results = self.errors = self.bytes = 0
        self.prompt_tokens = self.completion_tokens = self.cached_tokens = 0
        for record in commits:
            self.add(record)

    def add(self, record: PartCommit) -> None:
        self.results += record.results
        self.errors += record.errors
        self.bytes += record.bytes
        self.prompt_tokens += record.prompt_tokens
        self.completion_tokens += record.completion_tokens
        self.cached_tokens += record.cached_tokens

    def progress(self, total_input_requests: int) -> JobProgress:
        processed = self.results + self.errors
        return JobProgress(
            # Whole percent, floored: 100 only when every line is in a file.
            percent=100 * processed // total_input_requests if total_input_requests else 100,
            total_input_requests=total_input_requests,
            total_processed_requests=processed,
            successfully_processed_requests=self.results,
            failed_requests=self.errors,
            output_rows=processed,
            input_tokens=self.prompt_tokens,
            output_tokens=self.completion_tokens,
            cached_input_token_count=self.cached_tokens,
        )


def progress_of(commits: list[PartCommit], total_input_requests: int) -> JobProgress:
    return ProgressTotals(commits).progress(total_input_requests)


class Published(BaseModel):
    """What the last publish wrote (`_raybatch/published.json`), written after both
    files and before any part is removed: the files hold every committed part up to
    `through_seq`, and their first `sizes[name]` bytes are exactly those parts."""

    through_seq: int
    sizes: dict[str, int]


def read_published(location: Location) -> Optional[Published]:
    if not location.exists(PUBLISHED_FILE):
        return None
    return Published.model_validate_json(location.read_bytes(PUBLISHED_FILE))


COPY_CHUNK = 8 * 1024 * 1024


def publish_files(location: Location) -> None:
    """Write results.jsonl and errors.jsonl from every committed part, in commit order,
    then remove the parts, so that the output is not kept twice.

    Resumable, and exactly once: whatever point a crash stops it at, calling it again
    finishes it, each committed line in its file once.
    - The files are rewritten whole (streamed, visible only when complete) from what the
      last finished publish wrote (the first `Published.sizes` bytes of each file,
      which are the same whether or not a crashed attempt rewrote the file since) and
      the parts committed after it. A part is removed only once `published.json` says
      the files hold it, so every committed line is always in a part or in a file
      that the record vouches for.
    - A publish with nothing new committed since the last one writes nothing and only
      finishes removing the parts (a crash may have stopped it midway).
    - Lines committed after a publish (a re-run that commits more) are appended by the
      next publish the same way.
    Orphan parts (data without a commit record, from a writer that crashed between the
    two) are left alone: they never count, and one may be a part being written now.
    """
    commits = load_commits(location)
    last = commits[-1].seq if commits else 0
    before = read_published(location)
    if before is None or before.through_seq < last:
        kept = before.sizes if before else {}
        new = [record for record in commits if before is None or record.seq > before.through_seq]
        sizes = {}
        for step, (target, attribute) in enumerate(((RESULTS_FILE, "results_file"), (ERRORS_FILE, "errors_file")), 1):
            # A streamed write is not retried inside the writer (see AtomicWriter), so a
            # transient failure while uploading or closing is retried here, whole: a
            # failed attempt published nothing, and the next one writes the same bytes.
            sizes[target] = retrying("publish", location.where(target), functools.partial(
                _publish_once, location, target, kept.get(target, 0), [getattr(r, attribute) for r in new]))
            _crash_point(step)
        location.write_atomic(PUBLISHED_FILE, Published(through_seq=last, sizes=sizes).model_dump_json().encode())
        _crash_point(3)
    present = set(location.list(PARTS_DIR))
    published = [name for record in commits for name in (record.results_file, record.errors_file)
                 if name and posixpath.basename(name) in present]
    for step, _ in enumerate(location.delete_many(published), 4):
        _crash_point(step)


def _publish_once(location: Location, target: str, kept: int, parts: list[Optional[str]]) -> int:
    """One attempt at `target`: its first `kept` bytes as they are, then `parts`. Its size."""
    size = 0
    with location.open_atomic_writer(target) as writer:
        if kept:
            with location.open_read(target) as published:
                while size < kept:
                    chunk = published.read(min(COPY_CHUNK, kept - size))
                    if not chunk:
                        raise ValueError(f"{location.where(target)} is shorter than the {kept} bytes "
                                         f"{PUBLISHED_FILE} says it holds")
                    writer.write(chunk)
                    size += len(chunk)
        for part in parts:
            if part:
                data = location.read_bytes(part)
                writer.write(data)
                size += len(data)
    return size


def _crash_point(step: int) -> None:
    """The reliability tests' crash in the middle of a publish (`publish.crash`): steps
    1 and 2 after each file, 3 after published.json, 4 on after each part removed."""
    if faults.fires("publish.crash", step):
        os._exit(1)
