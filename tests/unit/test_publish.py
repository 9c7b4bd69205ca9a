"""Publishing results.jsonl/errors.jsonl from the committed parts (`publish_files`):
the parts are removed once published (no second copy of the output), a publish stopped
by a crash at any point is finished by the next one, and every committed line is in
the files exactly once whatever happened. Without Ray; the crashes are real process
exits (`publish.crash`) in a child process."""

import json
import os
import subprocess
import sys

import pytest

from raybatch.output_layout import read_published, publish_files
from raybatch.pipeline.write import OutputWriter
from raybatch.storage import Location
from tests.helpers import Faults, batch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def commit(out, lines, error_every=3, total=100):
    writer = OutputWriter(str(out), cap_bytes=10**9, part_max_rows=4, part_max_bytes=10**9,
                          part_max_seconds=3600, total_input_requests=total)
    writer.append(batch(lines, error_every=error_every))
    writer.flush()


def published_lines(out):
    results = [json.loads(x)["line"] for x in (out / "results.jsonl").read_bytes().splitlines()]
    errors = [json.loads(x)["line"] for x in (out / "errors.jsonl").read_bytes().splitlines()]
    return results, errors


def parts(out):
    folder = out / "_raybatch" / "parts"
    return sorted(os.listdir(folder)) if folder.exists() else []


def expect_exactly(out, lines, error_every=3):
    results, errors = published_lines(out)
    assert sorted(results + errors) == sorted(lines), "every committed line exactly once"
    assert sorted(errors) == [n for n in sorted(lines) if n % error_every == 0]


def test_publishing_removes_the_parts_and_a_second_publish_changes_nothing(tmp_path):
    commit(tmp_path, range(1, 11))
    assert len(parts(tmp_path)) == 6  # 3 parts, each with results and errors
    publish_files(Location(str(tmp_path)))
    expect_exactly(tmp_path, range(1, 11))
    assert parts(tmp_path) == []
    assert len(os.listdir(tmp_path / "_raybatch" / "commits")) == 3  # the records stay: they are the truth
    files = {name: (tmp_path / name).read_bytes() for name in ("results.jsonl", "errors.jsonl")}
    publish_files(Location(str(tmp_path)))
    assert {name: (tmp_path / name).read_bytes() for name in files} == files
    assert read_published(Location(str(tmp_path))).through_seq == 3


def test_lines_committed_after_a_publish_are_added_by_the_next_one(tmp_path):
    """A re-run over a published output (raybatch run again) that commits more."""
    commit(tmp_path, range(1, 11))
    publish_files(Location(str(tmp_path)))
    commit(tmp_path, range(5, 21))  # 5..10 already committed: skipped by the writer
    publish_files(Location(str(tmp_path)))
    expect_exactly(tmp_path, range(1, 21))
    assert parts(tmp_path) == []


def test_an_orphan_part_is_neither_published_nor_removed(tmp_path):
    commit(tmp_path, range(1, 5))
    orphan = tmp_path / "_raybatch" / "parts" / "00000009-dead.results.jsonl"
    orphan.write_text('{"line": 99}\n')
    publish_files(Location(str(tmp_path)))
    expect_exactly(tmp_path, range(1, 5))
    assert parts(tmp_path) == [orphan.name]


def _publish_in_a_child(out, faults_dir) -> int:
    env = {**os.environ, "RAYBATCH_FAULTS": str(faults_dir), "PYTHONPATH": ROOT}
    code = ("import sys; from raybatch.output_layout import publish_files; "
            "from raybatch.storage import Location; publish_files(Location(sys.argv[1]))")
    return subprocess.run([sys.executable, "-c", code, str(out)], env=env, timeout=120).returncode


# 1, 2: after results.jsonl, after errors.jsonl; 3: after published.json; 5: parts half removed.
@pytest.mark.parametrize("step", [1, 2, 3, 5])
@pytest.mark.parametrize("republish", [False, True], ids=["first", "after-more-commits"])
def test_a_crash_mid_publish_is_finished_by_the_next_publish(tmp_path, step, republish):
    out = tmp_path / "out"
    lines = list(range(1, 11))
    commit(out, lines)
    if republish:  # the hard case: a file that a crashed attempt may have rewritten already
        publish_files(Location(str(out)))
        commit(out, range(1, 21))
        lines = list(range(1, 21))
    faults = Faults(tmp_path / "faults")
    faults.arm("publish.crash", after=step)
    assert _publish_in_a_child(out, tmp_path / "faults") == 1
    assert faults.fired("publish.crash")
    publish_files(Location(str(out)))  # the restart (the scheduler's next pass, the re-run)
    expect_exactly(out, lines)
    assert parts(out) == []


def test_on_s3_the_parts_are_removed_and_a_crash_mid_publish_is_finished(s3_endpoint, tmp_path):
    """The same on S3 (moto): the files are multipart uploads made visible whole, the
    parts go in DeleteObjects requests; the crash comes after the first file."""
    import boto3
    import fsspec

    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket="publish")
    out = "s3://publish/job-1"
    commit(out, range(1, 11))
    fs = fsspec.filesystem("s3", client_kwargs={"endpoint_url": s3_endpoint})
    assert len(fs.ls("publish/job-1/_raybatch/parts")) == 6
    faults = Faults(tmp_path / "faults")
    faults.arm("publish.crash", after=1)
    assert _publish_in_a_child(out, tmp_path / "faults") == 1
    publish_files(Location(out))
    fs.invalidate_cache()
    assert not fs.exists("publish/job-1/_raybatch/parts") or fs.ls("publish/job-1/_raybatch/parts") == []
    results = [json.loads(x)["line"] for x in fs.cat_file("publish/job-1/results.jsonl").splitlines()]
    errors = [json.loads(x)["line"] for x in fs.cat_file("publish/job-1/errors.jsonl").splitlines()]
    assert sorted(results + errors) == list(range(1, 11)) and errors == [3, 6, 9]
