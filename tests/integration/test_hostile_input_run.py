"""Hostile input through whole runs: Ray Data (these inputs are small, but are sent
through it as large ones are), the input scan, the scripted engine (no
delay), the writer and the published files, each run held by `check_run` to every line
exactly once with its exact code. The line-level outcomes are decided and tested without
Ray in tests/unit/test_hostile_input.py; this proves they hold across the cluster's
workers: 10,000 lines with 1% bad, 1,000 tiny shards beside a large one, an empty file, a
file of only bad lines, and gzip shards (whole, two-member, truncated) beside a plain one.
"""

from __future__ import annotations

from pathlib import Path

from raybatch.config import RunConfig
from raybatch.runner import run_job
from tests.helpers import Expected, check_run
from tests.hostile import MAX_LINE_BYTES, many_shards, one_percent_bad, only_bad, truncated_gzip, write_gzipped


def _run(tmp_path: Path, expected: list[Expected]) -> None:
    config = RunConfig(
        input=str(tmp_path / "in"),
        output=str(tmp_path / "out"),
        model="scripted",
        max_line_bytes=MAX_LINE_BYTES,
        part_max_rows=100_000,
        in_driver_bytes=0,  # the scan and the pipeline through Ray Data's workers, as for a large input
        # Engine batches of 256: small ones would cost Ray Data a task each on 2 cores.
        engine={"kind": "scripted", "batch_size": 256, "concurrent_batches": 4},
    )
    summary = run_job(config)
    assert summary.state == "completed"
    assert summary.blank_lines == sum(e.blank for e in expected)
    check_run(config.output, expected)


def test_ten_thousand_lines_one_percent_bad(ray_cluster, tmp_path):
    builder = one_percent_bad(lines=10_000)
    builder.write(str(tmp_path / "in"))
    _run(tmp_path, builder.expected)


def test_thousand_tiny_shards_and_a_large_one(ray_cluster, tmp_path):
    builder = many_shards(tiny=1000, large_lines=5000)
    builder.write(str(tmp_path / "in"))
    _run(tmp_path, builder.expected)


def test_empty_file(ray_cluster, tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "empty.jsonl").write_bytes(b"")
    _run(tmp_path, [])
    assert (tmp_path / "out" / "results.jsonl").read_bytes() == b""
    assert (tmp_path / "out" / "errors.jsonl").read_bytes() == b""


def test_only_bad_lines(ray_cluster, tmp_path):
    builder = only_bad()
    builder.write(str(tmp_path / "in"))
    _run(tmp_path, builder.expected)


def test_gzip_shards_named_jsonl(ray_cluster, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    gzipped = one_percent_bad("a.jsonl", 1000)
    one_percent_bad("b-multi.jsonl", 1000, gzipped, hostile_ids=())  # two gzip members
    write_gzipped(gzipped, folder)
    truncated = one_percent_bad("c-truncated.jsonl", 1000, hostile_ids=())
    cut, truncated_expected = truncated_gzip(truncated, "c-truncated.jsonl", keep=0.5)
    (folder / "c-truncated.jsonl").write_bytes(cut)
    plain = one_percent_bad("d-plain.jsonl", 200, hostile_ids=())
    plain.write(str(folder))
    _run(tmp_path, gzipped.expected + truncated_expected + plain.expected)
