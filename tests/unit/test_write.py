"""The writer and the commit records, on local storage, without Ray."""

import json
import time

import pytest

from raybatch.output_layout import load_commits, publish_files
from raybatch.pipeline.write import OutputWriter
from raybatch.storage import Location
from tests.helpers import batch, wait_until


def writer(out, cap=10**9, rows=4, total=10):
    return OutputWriter(str(out), cap_bytes=cap, part_max_rows=rows, part_max_bytes=10**9, part_max_seconds=3600, total_input_requests=total)


def output_lines(out):
    publish_files(Location(str(out)))
    results = (out / "results.jsonl").read_bytes().splitlines()
    errors = (out / "errors.jsonl").read_bytes().splitlines()
    return [json.loads(x)["line"] for x in results], [json.loads(x)["line"] for x in errors]


def test_parts_commit_every_n_rows_and_counters_match(tmp_path):
    w = writer(tmp_path)
    w.append(batch(range(1, 11), error_every=5))
    status = w.flush()
    assert [c.seq for c in load_commits(Location(str(tmp_path)))] == [1, 2, 3]
    assert status.progress.total_processed_requests == 10
    assert status.progress.failed_requests == 2
    assert status.progress.input_tokens == 30 and status.progress.cached_input_token_count == 10
    results, errors = output_lines(tmp_path)
    assert sorted(results + errors) == list(range(1, 11)) and errors == [5, 10]


def test_repeated_rows_are_written_once(tmp_path):
    w = writer(tmp_path)
    w.append(batch([1, 2, 3]))
    w.append(batch([2, 3, 4, 5]))  # a retried task sends rows again
    w.flush()
    again = writer(tmp_path)  # a re-run over the same output
    again.append(batch([1, 5, 6]))
    again.flush()
    assert sorted(output_lines(tmp_path)[0]) == [1, 2, 3, 4, 5, 6]
    assert output_lines(tmp_path)[0] == output_lines(tmp_path)[0]  # publishing is idempotent


def test_uncommitted_part_data_is_ignored(tmp_path):
    w = writer(tmp_path)
    w.append(batch([1, 2, 3, 4]))
    (tmp_path / "_raybatch" / "parts" / "00000002-dead.results.jsonl").write_text('{"line": 99}\n')
    assert output_lines(tmp_path)[0] == [1, 2, 3, 4]


def test_cap_keeps_whole_lines_that_fit(tmp_path):
    line_size = len(json.dumps({"line": 1, "pad": "x" * 20})) + 1
    w = writer(tmp_path, cap=line_size * 6 + 5, rows=4)
    status = w.append(batch(range(1, 11)))
    assert status.cap_reached
    assert status.committed_bytes == line_size * 6
    status = w.flush()
    assert status.progress.total_processed_requests == 6
    assert output_lines(tmp_path)[0] == [1, 2, 3, 4, 5, 6]
    progress = json.loads((tmp_path / "_raybatch" / "progress.json").read_text())
    assert progress["capReached"] and progress["progress"]["totalProcessedRequests"] == 6


def test_a_writer_made_before_the_scan_publishes_progress_once_it_knows_the_total(tmp_path):
    """A run creates its writer before it has counted the input lines (the actor's
    process starts meanwhile): no progress with a made-up total is ever visible."""
    from raybatch.output_layout import read_progress

    w = OutputWriter(str(tmp_path), cap_bytes=10**9, part_max_rows=4, part_max_bytes=10**9, part_max_seconds=3600)
    assert read_progress(Location(str(tmp_path))) is None
    assert w.begin(10).progress.total_input_requests == 10
    assert read_progress(Location(str(tmp_path))).progress.total_input_requests == 10
    w.append(batch(range(1, 5)))
    assert read_progress(Location(str(tmp_path))).progress.total_processed_requests == 4


def test_the_first_rows_commit_at_once_later_ones_by_the_part_rules(tmp_path):
    """Issue 9, item 4: a new job shows progress with its first answers, not after a
    whole part (1000 rows) or `part_max_seconds`; a resumed attempt does the same."""
    from raybatch.output_layout import read_progress

    w = writer(tmp_path, rows=1000, total=20)
    assert w.append(batch([1, 2])).progress.total_processed_requests == 2
    assert w.append(batch([3, 4])).progress.total_processed_requests == 2  # buffered: a part holds 1000
    w.flush()
    resumed = writer(tmp_path, rows=1000, total=20)
    assert resumed.append(batch([5])).progress.total_processed_requests == 5
    assert read_progress(Location(str(tmp_path))).progress.total_processed_requests == 5


def test_a_burst_of_answers_commits_once_appends_stop(tmp_path):
    """Rows that started together end together: after the first commit, the rest of a
    burst is held (part_max_seconds has not passed) and committed by the quiet timer
    once appends stop, with no further call; never while they go on."""
    w = OutputWriter(str(tmp_path), cap_bytes=10**9, part_max_rows=1000, part_max_bytes=10**9,
                     part_max_seconds=3600, part_quiet_seconds=1.0, total_input_requests=30)
    out = Location(str(tmp_path))

    def committed() -> int:
        return sum(c.results + c.errors for c in load_commits(out))

    w.append(batch([1]))  # a job's first rows commit at once
    assert committed() == 1
    for line in range(2, 22):  # one append every 0.05 s for a second: never quiet for 1 s
        w.append(batch([line]))
        time.sleep(0.05)
    assert committed() == 1, "committed while appends still came"
    wait_until(lambda: committed() == 21, timeout=5, interval=0.05)
    progress = json.loads((tmp_path / "_raybatch" / "progress.json").read_text())
    assert progress["progress"]["totalProcessedRequests"] == 21
    w.append(batch([22]))  # the next burst: held, then committed by a new timer
    wait_until(lambda: committed() == 22, timeout=5, interval=0.05)
    assert [c.seq for c in load_commits(out)] == [1, 2, 3]
    assert sorted(output_lines(tmp_path)[0]) == list(range(1, 23))


def test_a_quiet_commit_that_fails_fails_the_next_call_and_commits_nothing(tmp_path):
    """The timer's commit has no caller to raise to: its failure is raised by the
    writer's next call, so the run fails (and its next attempt answers those rows)
    instead of ending as if they were written."""
    w = OutputWriter(str(tmp_path), cap_bytes=10**9, part_max_rows=1000, part_max_bytes=10**9,
                     part_max_seconds=3600, part_quiet_seconds=0.2, total_input_requests=3)
    w.append(batch([1]))  # committed at once

    def storage_down(rows, size):
        raise OSError("storage down")

    w._commit_part = storage_down
    w.append(batch([2]))
    wait_until(lambda: w._quiet_failure is not None, timeout=5, interval=0.05)  # the timer tried, and failed
    with pytest.raises(OSError, match="^storage down$"):
        w.append(batch([3]))
    assert [c.results for c in load_commits(Location(str(tmp_path)))] == [1]
