"""The output folder's format: where a job's output location keeps its parts, commit
records and progress, and how the control plane reads them. `pipeline/write.py`'s
`OutputWriter` is the one writer of this format; the scheduler, the runner and the
tests read it through this module.

Layout under the output location:

    results.jsonl, errors.jsonl        published from the committed parts at the end
    _raybatch/parts/<seq>-<run>.{results,errors}.jsonl    part data
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

import itertools
from typing import Iterator, Optional

from pydantic import BaseModel, Field

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
