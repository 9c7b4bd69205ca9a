"""Input limits against a hostile tenant (issue 10, item 3): a custom_id past its limit is
an error row of its own code, the input scan's memory does not grow with custom_id
length, and a shard (gzip bombs included) is read only up to its expanded size limit."""

from __future__ import annotations

import gzip
import io
import json

import pyarrow as pa
import pytest

from raybatch.exceptions import InputTooLarge
from raybatch.pipeline.preprocess import prepare_requests
from raybatch.pipeline.read import expanded_size, read_shards
from raybatch.pipeline.validate import DuplicateScan, claims_among, scan_custom_ids
from tests.helpers import peak_python_memory

MIB = 1 << 20


def _line(custom_id: str, **body) -> bytes:
    return json.dumps({"custom_id": custom_id, "body": {"messages": [{"role": "user", "content": "hi"}], **body}}).encode()


def _raw(*lines: bytes, shard: str = "in.jsonl") -> pa.Table:
    return pa.Table.from_pydict({"shard": [shard] * len(lines), "line": list(range(1, len(lines) + 1)), "raw": list(lines)})


def _prepared(raw: pa.Table, **options) -> list[dict]:
    return prepare_requests(raw, max_line_bytes=4 * MIB, max_n=4, job_defaults={}, duplicates=frozenset(), **options).to_pylist()


# ------------------------------------------------------------------ custom_id length


def test_a_custom_id_past_512_bytes_is_its_own_error_and_is_not_echoed():
    at_limit, past = "x" * 512, "x" * 513
    emoji = "😀" * 129  # 129 characters, 516 bytes: the limit is in bytes
    rows = _prepared(_raw(_line(at_limit), _line(past), _line(emoji)))
    assert rows[0]["error_code"] is None and rows[0]["custom_id"] == at_limit
    for row, size in zip(rows[1:], (513, 516)):
        assert row["error_code"] == "custom_id_too_long"
        assert row["error_message"] == f"custom_id is {size} bytes, over the limit of 512; it is not echoed"
        assert row["custom_id"] is None and row["request"] is None


def test_the_custom_id_limit_is_a_setting():
    rows = _prepared(_raw(_line("x" * 600), _line("y" * 1001)), max_custom_id_bytes=1000)
    assert [r["error_code"] for r in rows] == [None, "custom_id_too_long"]


def test_too_long_ids_claim_nothing_in_the_scan():
    """Two equal over-long ids are two custom_id_too_long rows, not a duplicate."""
    raw = _raw(_line("z" * 600), _line("z" * 600), _line("ok"), _line("ok"))
    scanned = scan_custom_ids(raw, max_line_bytes=MIB)
    digests = scanned["custom_id_digest"].to_pylist()
    assert digests[:2] == [None, None] and len(digests[2]) == 16 and digests[2] == digests[3]
    found = DuplicateScan(["in.jsonl"])
    found.add(scanned)
    duplicates = found.duplicates(lambda wanted: claims_among([raw], wanted, max_line_bytes=MIB))
    assert (found.lines, found.blank_lines, duplicates) == (4, 0, {("in.jsonl", 4)})


def test_the_first_claim_wins_in_shard_then_line_order_whatever_order_batches_arrive():
    found = DuplicateScan(["a.jsonl", "b.jsonl"])
    b, a = _raw(_line("q"), _line("r"), shard="b.jsonl"), _raw(b"", _line("r"), _line("q"), shard="a.jsonl")
    found.add(scan_custom_ids(b, max_line_bytes=MIB))
    found.add(scan_custom_ids(a, max_line_bytes=MIB))
    assert (found.lines, found.blank_lines) == (4, 1)
    assert found.duplicates(lambda wanted: claims_among([a, b], wanted, max_line_bytes=MIB)) == {("b.jsonl", 1), ("b.jsonl", 2)}


def _scan_long_ids(lines: int, id_bytes: int, keep_ids: bool) -> tuple[int, set]:
    """The driver's side of the scan over `lines` lines with ids of `id_bytes`, the last
    repeating the first. Each line exists only while it is scanned, as in a stream.
    `keep_ids`: also keep the ids, as the scan did before digests (the control)."""
    found, kept = DuplicateScan(["in.jsonl"]), {}
    for number in range(1, lines + 2):
        custom_id = f"{number % lines:08d}" + "x" * id_bytes  # line lines+1 repeats line 1
        raw = _raw(_line(custom_id))
        raw = raw.set_column(1, "line", pa.array([number], pa.int64()))
        found.add(scan_custom_ids(raw, max_line_bytes=4 * MIB, max_custom_id_bytes=4 * MIB))
        if keep_ids:
            kept.setdefault(custom_id, number)

    def confirm(wanted):  # the claims of the repeated id are parsed: the lines made again
        numbers = sorted(line for _, line in wanted)
        again = pa.table({"shard": ["in.jsonl"] * len(numbers), "line": numbers,
                          "raw": [_line(f"{n % lines:08d}" + "x" * id_bytes) for n in numbers]})
        return claims_among([again], wanted, max_line_bytes=4 * MIB, max_custom_id_bytes=4 * MIB)

    return found.lines, found.duplicates(confirm)


def test_scan_memory_does_not_grow_with_custom_id_length():
    """64 lines with 1 MB custom_ids (accepted here: the limit raised to 4 MiB). The scan
    keeps 24 bytes a line; the control, which keeps the ids as the old scan did, peaks
    past 64 MB, so the measure would catch a scan that holds them."""
    args = (64, MIB, False)
    peak, (lines, duplicates) = peak_python_memory(_scan_long_ids, *args, warm_up=(2, 10, False))
    assert lines == 65 and duplicates == {("in.jsonl", 65)}
    assert peak < 16 * MIB, peak
    control, _ = peak_python_memory(_scan_long_ids, 64, MIB, True, warm_up=(2, 10, False))
    assert control > 64 * MIB, control


# ------------------------------------------------------------------ expanded size


def _shards(tmp_path, name: str, data: bytes) -> pa.Table:
    path = tmp_path / name
    path.write_bytes(data)
    return pa.Table.from_pylist([{"url": str(path), "name": name, "size": len(data)}])


def _bomb(expanded: int) -> bytes:
    """Valid JSONL lines that gzip to about 1/1000 of their size."""
    line = _line("a" * 100, extra="b" * 10_000) + b"\n"
    out = io.BytesIO()
    with gzip.GzipFile(fileobj=out, mode="wb") as stream:
        for _ in range(expanded // len(line) + 1):
            stream.write(line)
    return out.getvalue()


def test_a_gzip_shard_stops_at_its_expanded_limit(tmp_path):
    bomb = _bomb(8 * MIB)
    assert len(bomb) < 100_000  # a few KB on the wire
    shards = _shards(tmp_path, "bomb.jsonl", bomb)
    with pytest.raises(InputTooLarge) as refused:
        for _ in read_shards(shards, max_line_bytes=MIB, max_shard_bytes=2 * MIB):
            pass
    assert str(refused.value) == (
        f"input shard bomb.jsonl expands to more than {2 * MIB} bytes, the input size limit "
        "(a gzip shard counts decompressed); nothing past the limit was read"
    )
    lines = sum(t.num_rows for t in read_shards(shards, max_line_bytes=MIB, max_shard_bytes=16 * MIB))
    assert lines > 700  # within the limit it reads as before


def test_a_plain_shard_and_one_endless_line_stop_too(tmp_path):
    for name, data in (("plain.jsonl", (_line("p") + b"\n") * 100_000), ("endless.jsonl", b"0" * (5 * MIB))):
        with pytest.raises(InputTooLarge, match=f"input shard {name} expands to more than 1048576 bytes"):
            list(read_shards(_shards(tmp_path, name, data), max_line_bytes=4096, max_shard_bytes=MIB))


def test_a_shard_exactly_at_the_limit_is_read(tmp_path):
    data = (_line("e") + b"\n") * 10
    tables = list(read_shards(_shards(tmp_path, "exact.jsonl", data), max_line_bytes=4096, max_shard_bytes=len(data)))
    assert sum(t.num_rows for t in tables) == 10


def test_expanded_size_gives_up_just_past_the_limit():
    bomb = _bomb(64 * MIB)
    assert expanded_size(io.BufferedReader(io.BytesIO(bomb)), 64 * MIB + MIB) > 64 * MIB
    size = expanded_size(io.BufferedReader(io.BytesIO(bomb)), 4 * MIB)
    assert 4 * MIB < size <= 5 * MIB  # read one 1 MiB chunk past the limit, no further
    plain = b"x\n" * 1000
    assert expanded_size(io.BufferedReader(io.BytesIO(plain)), MIB) == len(plain)
