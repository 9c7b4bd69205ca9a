"""Hostile input, each with one decided outcome (the table is in README.md, "Input" →
"Hostile input"), without Ray: the stage functions are driven directly, and
`run_without_ray` chains them as the runner does (read → scan → validate/preprocess →
scripted engine → postprocess → writer) so that `check_run` can hold the result files to
the invariant: every non-blank line exactly once, with its exact code.

Decided outcomes, input → outcome:

    10,000 lines, 1% bad of every kind   → each bad line its code, blanks skipped, rest answered
    one 50 MB line (plain or gzip)       → one line_too_large row, < 8 MiB peak memory
    nesting past 64 levels (100,000)     → invalid_json "nested deeper than 64 levels"
    an integer of 1,000,000 digits       → invalid_json, in milliseconds of CPU
    custom_id "" or not a string         → missing_custom_id
    custom_id of 512 bytes, ../../x, NUL, U+202E → answered, echoed byte for byte, never a path
    custom_id past 512 bytes                   → custom_id_too_long, not echoed, claims nothing
    a lone surrogate escape, any string  → invalid_json
    empty file                           → no rows, empty result files
    only bad lines                       → all error rows
    gzip named .jsonl                    → read through gzip; damage: one invalid_json row
                                           at the first line it could not deliver, then none
    1,000 tiny shards + one large        → linear in shards; every line once
"""

from __future__ import annotations

import asyncio
import gzip
import inspect
import io
import json
import re
import sys
import time
import zlib
from pathlib import Path

import pyarrow as pa
import pytest

from raybatch.exceptions import RowError
from raybatch.engines.replica import EngineReplica, ReplicaSpec
from raybatch.pipeline.engine import answer_batch
from raybatch.pipeline.postprocess import finish_rows
from raybatch.pipeline.preprocess import prepare_requests
from raybatch.pipeline.rows import EngineRequest
from raybatch.pipeline.read import UNREADABLE, LineSet, iter_lines, read_shards, shard_lines
from raybatch.pipeline.rows import RAW_SCHEMA, column
from raybatch.pipeline.validate import MAX_NESTING, DuplicateScan, claims_among, scan_custom_ids, validate_body, validate_line
from raybatch.output_layout import publish_files
from raybatch.pipeline.write import OutputWriter
from raybatch.protocol import CHAT_URL
from raybatch.storage import Location, list_shards
from tests.helpers import InputBuilder, check_run, peak_python_memory, read_jsonl
from tests.hostile import (
    BAD_KINDS,
    HOSTILE_CUSTOM_IDS,
    MAX_LINE_BYTES,
    bad_line,
    chat,
    dumps,
    many_shards,
    one_percent_bad,
    only_bad,
    truncated_gzip,
    write_gzipped,
)

MIB = 1 << 20


# ----------------------------------------------------------------------------- the chain


def _shard_table(input_url: str) -> pa.Table:
    shards = list_shards(input_url)
    return pa.Table.from_pylist([{"url": s.url, "name": s.name, "size": s.size} for s in shards])


def read_all(input_url: str, max_line_bytes: int = MAX_LINE_BYTES) -> pa.Table:
    tables = list(read_shards(_shard_table(input_url), max_line_bytes=max_line_bytes))
    return pa.concat_tables(tables) if tables else RAW_SCHEMA.empty_table()


def scan(raw: pa.Table, max_line_bytes: int) -> tuple[int, int, frozenset]:
    """(non-blank lines, blank lines, duplicates) as the runner's input scan finds them:
    the lines come in shard-then-line order, so the first claim of a custom_id wins."""
    found = DuplicateScan(sorted(set(column(raw, "shard"))))
    found.add(scan_custom_ids(raw, max_line_bytes=max_line_bytes))
    duplicates = found.duplicates(lambda wanted: claims_among([raw], wanted, max_line_bytes=max_line_bytes))
    return found.lines, found.blank_lines, frozenset(duplicates)


def run_without_ray(input_url: str, output_url: str, max_line_bytes: int = MAX_LINE_BYTES, **engine_args) -> int:
    """Every stage function in the runner's order, in this process. Returns the blank lines."""
    raw = read_all(input_url, max_line_bytes)
    lines, blanks, duplicates = scan(raw, max_line_bytes)
    writer = OutputWriter(
        output_url, cap_bytes=1 << 40, part_max_rows=1 << 20, part_max_bytes=1 << 40,
        part_max_seconds=1e9, total_input_requests=lines,
    )
    # The replica's own code, called in this process instead of through the pool.
    replica = EngineReplica(ReplicaSpec(kind="scripted", model="scripted", engine_args=engine_args))

    async def submit(rows):
        return [await replica.generate(request) for _, _, request in rows]

    for batch in raw.to_batches(max_chunksize=1024):
        requests = prepare_requests(
            pa.Table.from_batches([batch]), max_line_bytes=max_line_bytes, max_n=4,
            job_defaults={}, duplicates=duplicates,
        )
        writer.append(finish_rows(asyncio.run(answer_batch(requests, submit)), model="scripted"))
    writer.flush()
    publish_files(Location(output_url))
    return blanks


def run_and_check(builder: InputBuilder, tmp_path: Path, **engine_args) -> dict:
    builder.write(str(tmp_path / "in"))
    blanks = run_without_ray(str(tmp_path / "in"), str(tmp_path / "out"), **engine_args)
    assert blanks == sum(e.blank for e in builder.expected)
    return check_run(str(tmp_path / "out"), builder.expected)


def error_of(raw, max_line_bytes: int = MIB, **kwargs) -> tuple:
    with pytest.raises(RowError) as caught:
        validate_line(raw, max_line_bytes=max_line_bytes, max_n=4, job_defaults={}, **kwargs)
    return caught.value.code, caught.value.custom_id, caught.value.message


def prepared(raws: list, max_line_bytes: int = MIB) -> list[dict]:
    """prepare_requests over lines 1..n of one shard: its rows, blank lines dropped."""
    batch = pa.Table.from_pydict(
        {"shard": ["s"] * len(raws), "line": list(range(1, len(raws) + 1)), "raw": raws}, schema=RAW_SCHEMA
    )
    table = prepare_requests(batch, max_line_bytes=max_line_bytes, max_n=4, job_defaults={}, duplicates=frozenset())
    return table.to_pylist()


# ------------------------------------------------- 1. 10,000 lines, 1% bad of every kind


def test_ten_thousand_lines_one_percent_bad_each_line_once(tmp_path):
    builder = one_percent_bad(lines=10_000)
    bad = [e for e in builder.expected if e.error or e.blank]
    assert len(builder.expected) == 10_000 and len(bad) == 100
    kinds = {BAD_KINDS[(e.line - 1) // 100 % len(BAD_KINDS)] for e in bad}
    assert kinds == set(BAD_KINDS)  # every kind is in there, ~7 times each
    rows = run_and_check(builder, tmp_path)
    assert len(rows) == 9_900
    codes = {e.error for e in bad}
    assert codes == {None, "invalid_json", "invalid_request", "missing_custom_id", "duplicate_custom_id", "line_too_large"}


def test_every_bad_kind_gets_its_code_from_validate_line():
    for kind in BAD_KINDS:
        raw, echoed, code = bad_line(kind, "me", earlier="me")
        raw = raw if isinstance(raw, bytes) else dumps(raw)
        if code is None:
            assert prepared([raw]) == [], kind  # blank: no row at all
            continue
        if code == "line_too_large":
            raw = next(iter_lines(io.BytesIO(raw), MAX_LINE_BYTES))[1]
        assert error_of(raw, MAX_LINE_BYTES, is_duplicate=kind == "duplicate_custom_id")[:2] == (code, echoed), kind


# -------------------------------------------------------------------- 2. one 50 MB line


def _write_huge_line(path: Path, compress: bool) -> None:
    """good line, a 50 MB line, good line; written in chunks so the test holds no 50 MB."""
    pack = zlib.compressobj(wbits=31) if compress else None
    with open(path, "wb") as out:
        def put(data: bytes) -> None:
            out.write(pack.compress(data) if pack else data)

        put(dumps({"custom_id": "before", "body": chat("a")}) + b"\n" + b'{"custom_id": "huge", "body": "')
        for _ in range(50):
            put(b"x" * MIB)
        put(b'"}\n' + dumps({"custom_id": "after", "body": chat("b")}) + b"\n")
        if pack:
            out.write(pack.flush())


def _read_scan_and_prepare(input_url: str):
    raw = read_all(input_url, MIB)
    lines, blanks, duplicates = scan(raw, MIB)
    rows = prepare_requests(raw, max_line_bytes=MIB, max_n=4, job_defaults={}, duplicates=duplicates).to_pylist()
    return lines, blanks, rows


@pytest.mark.parametrize("compress", [False, True], ids=["plain", "gzip"])
def test_fifty_megabyte_line_is_one_error_row_in_bounded_memory(tmp_path, compress):
    (tmp_path / "in").mkdir()
    _write_huge_line(tmp_path / "in" / "huge.jsonl", compress)
    (tmp_path / "small").mkdir()
    (tmp_path / "small" / "one.jsonl").write_bytes(dumps({"custom_id": "a", "body": chat("a")}) + b"\n")
    peak, (lines, blanks, rows) = peak_python_memory(
        _read_scan_and_prepare, str(tmp_path / "in"), warm_up=(str(tmp_path / "small"),)
    )
    assert peak < 8 * MIB, peak
    assert (lines, blanks) == (3, 0)
    assert [(r["line"], r["custom_id"], r["error_code"]) for r in rows] == [
        (1, "before", None), (2, None, "line_too_large"), (3, "after", None)
    ]


# ------------------------------------------------------------------------ 3. deep nesting


@pytest.mark.parametrize(
    "raw",
    [
        b'{"custom_id": "x", "body": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
        b'{"custom_id": "x", "body": ' + b"[" * 100_000,  # unclosed too
        b'{"custom_id": "x", "body": ' + b'{"a": ' * 100_000 + b"1" + b"}" * 100_000 + b"}",
        b'{"custom_id": "x", "body": {"messages": ' + b"[" * 900 + b"]" * 900 + b"}}",
        b'{"custom_id": "x", "body": {"messages": [{"role": "user", "content": "hi"}], "extra": '
        + b"[" * (MAX_NESTING - 1) + b"]" * (MAX_NESTING - 1) + b"}}",  # 65 levels with the line and body
    ],
    ids=["100k-lists", "100k-unclosed", "100k-objects", "900-in-messages", "65-levels"],
)
def test_nesting_past_the_limit_is_invalid_json(raw):
    assert error_of(raw) == ("invalid_json", None, f"line is nested deeper than {MAX_NESTING} levels")
    assert prepared([raw])[0]["error_code"] == "invalid_json"
    # The scan agrees: a refused line claims no custom_id, so a valid line after it with
    # the same id is no duplicate (the scan reads the id off the line's start unparsed,
    # and parses the line only because another claims the same id).
    valid = b'{"custom_id": "x", "body": {"messages": [{"role": "user", "content": "hi"}]}}'
    both = pa.Table.from_pydict({"shard": ["s", "s"], "line": [1, 2], "raw": [raw, valid]})
    assert scan(both, MIB) == (2, 0, frozenset())


def _schema(levels: int) -> dict:
    schema: dict = {"type": "string"}
    for _ in range(levels):
        schema = {"type": "array", "items": schema}
    return schema


def test_nesting_at_the_limit_passes_and_survives_every_later_stage():
    # line 1, body 2, response_format 3, json_schema 4, schema 5, then one per level
    response_format = {"type": "json_schema", "json_schema": {"name": "n", "schema": _schema(59)}}
    body = {**chat("hi"), "response_format": response_format}
    raw = dumps({"custom_id": "deep", "body": body})
    (row,) = prepared([raw])
    assert row["error_code"] is None
    request = EngineRequest.model_validate_json(row["request"])  # what the engine stage does
    assert request.structured_output["json"] == _schema(59)
    assert error_of(raw.replace(b'"string"', b'{"type": "array", "items": {"type": "string"}}'))[0] == "invalid_json"


def test_nesting_outcome_does_not_depend_on_the_callers_stack():
    """json.loads gives up at ~1000 levels minus the stack in use, so a line 500 deep
    would parse in one worker and not in another; the limit decides first."""
    raw = b'{"custom_id": "x", "body": ' + b"[" * 500 + b"]" * 500 + b"}"

    def deep(levels: int):
        return deep(levels - 1) if levels else error_of(raw)

    room = 50  # frames left for json.loads: far fewer than 500 levels need
    assert deep(sys.getrecursionlimit() - len(inspect.stack()) - room) == error_of(raw)


@pytest.mark.parametrize("field", ["messages", "prompt", "stop", "response_format"])
def test_pydantic_meets_deep_values_without_crashing(field):
    deep: list = []
    for _ in range(900):
        deep = [deep]
    url = CHAT_URL if field != "prompt" else "/v1/completions"
    body = {"messages": [{"role": "user", "content": "x"}], "prompt": "x", field: deep}
    with pytest.raises(RowError) as caught:
        validate_body(url, body, max_n=4)
    assert caught.value.code == "invalid_request"


# ---------------------------------------------------------- 4. an integer of 1,000,000 digits


@pytest.mark.parametrize(
    "raw, code",
    [
        (b'{"custom_id": "x", "body": {"messages": [], "max_tokens": ' + b"9" * 1_000_000 + b"}}", "invalid_json"),
        (b'{"custom_id": "x", "extra": -' + b"1" * 1_000_000 + b', "body": {}}', "invalid_json"),
        (b'{"custom_id": ' + b"7" * 1_000_000 + b"}", "invalid_json"),
        # A float of a million digits parses (to 1.0 or inf): the body check decides.
        (b'{"custom_id": "x", "body": {"messages": [{"role": "user", "content": "x"}], "temperature": 1'
         + b"0" * 1_000_000 + b".5}}", "invalid_request"),
    ],
    ids=["int-in-body", "negative-int-in-extras", "int-as-custom-id", "float"],
)
def test_million_digit_number_is_an_error_row_in_milliseconds(raw, code):
    started = time.process_time()
    got = error_of(raw)
    rows = prepared([raw])
    used = time.process_time() - started
    assert got[:2] == (code, None if code == "invalid_json" else "x")
    assert rows[0]["error_code"] == code
    assert used < 0.5, f"{used:.2f} s of CPU"
    if code == "invalid_json":
        assert got[2] == "line holds an integer with too many digits"


# ------------------------------------------------------------------------- 5. custom_ids


def test_empty_and_non_string_custom_ids_are_missing():
    for custom_id in ("", 7, None, ["a"], {"a": 1}, True):
        assert error_of(dumps({"custom_id": custom_id, "body": chat("x")}))[:2] == ("missing_custom_id", None)


def test_lone_surrogates_are_invalid_json_and_pairs_are_characters():
    for raw in (
        b'{"custom_id": "\\ud800", "body": {}}',
        b'{"custom_id": "a\\uDFFFb", "body": {}}',
        b'{"custom_id": "ok", "body": {"messages": [{"role": "user", "content": "\\ud83d"}]}}',
        b'{"custom_id": "ok", "body": {"\\udc00": 1, "messages": []}}',  # in a key
    ):
        assert error_of(raw) == ("invalid_json", None, "line holds a lone UTF-16 surrogate escape (\\ud800-\\udfff)")
    request = validate_line(
        b'{"custom_id": "\\ud83d\\ude00", "body": {"messages": [{"role": "user", "content": "\\\\ud800"}]}}',
        max_line_bytes=MIB, max_n=4, job_defaults={},
    )  # an escaped backslash before "ud800" is text, not an escape
    assert request.custom_id == "😀" and request.body.messages[0].content == "\\ud800"


def test_hostile_custom_ids_round_trip_exactly_and_never_become_paths(tmp_path):
    builder = InputBuilder()
    for custom_id in HOSTILE_CUSTOM_IDS:
        builder.ok("in.jsonl", custom_id, chat("hi"))
    builder.add("in.jsonl", {"custom_id": "../../x", "body": chat("again")}, "../../x", "duplicate_custom_id")
    builder.add("in.jsonl", {"custom_id": "b\u0000\u202ec"}, "b\u0000\u202ec", "invalid_request")
    rows = run_and_check(builder, tmp_path, invocations_dir=str(tmp_path / "calls"))
    assert set(rows) == set(HOSTILE_CUSTOM_IDS)
    errors = read_jsonl(str(tmp_path / "out" / "errors.jsonl"))
    assert [e["custom_id"] for e in errors] == ["../../x", "b\u0000\u202ec"]
    published = b"".join((tmp_path / "out" / f).read_bytes() for f in ("results.jsonl", "errors.jsonl"))
    assert b"\x00" not in published and b"a\\u0000b" in published  # escaped: JSON allows no raw NUL
    # Nothing outside the known layout was created, here or anywhere near.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calls", "in", "out"]
    layout = re.compile(
        r"(results|errors)\.jsonl|_raybatch/(progress\.json|published\.json|commits/\d{8}\.json"
        r"|parts/\d{8}-[0-9a-f]{8}\.(results|errors)\.jsonl)"
    )
    for path in (tmp_path / "out").rglob("*"):
        assert path.is_dir() or layout.fullmatch(str(path.relative_to(tmp_path / "out"))), path
    assert all(re.fullmatch(r"[0-9a-f]+\..+", p.name) for p in (tmp_path / "calls").iterdir())


# ------------------------------------------------------------------ 6. and 7. nothing good


def test_empty_file_is_zero_lines_and_empty_results(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "empty.jsonl").write_bytes(b"")
    assert read_all(str(tmp_path / "in")).num_rows == 0
    assert run_without_ray(str(tmp_path / "in"), str(tmp_path / "out")) == 0
    check_run(str(tmp_path / "out"), [])
    assert (tmp_path / "out" / "results.jsonl").read_bytes() == (tmp_path / "out" / "errors.jsonl").read_bytes() == b""


def test_only_bad_lines_are_all_error_rows(tmp_path):
    builder = only_bad()
    assert run_and_check(builder, tmp_path) == {}
    errors = read_jsonl(str(tmp_path / "out" / "errors.jsonl"))
    assert len(errors) == len(BAD_KINDS) - 1  # the blank line is no row


# ------------------------------------------------------------------------------- 8. gzip


def _small_input() -> InputBuilder:
    builder = InputBuilder()
    builder.add("a.jsonl", b"\xef\xbb\xbf" + dumps({"custom_id": "bom", "body": chat("x")}), "bom", end=b"\r\n")
    one_percent_bad("a.jsonl", 300, builder)
    one_percent_bad("b-multi.jsonl", 300, builder, hostile_ids=())
    return builder


def test_gzip_shard_named_jsonl_is_read_through_gzip(tmp_path):
    builder = _small_input()
    (tmp_path / "in").mkdir()
    write_gzipped(builder, tmp_path / "in")
    assert (tmp_path / "in" / "a.jsonl").read_bytes()[:2] == b"\x1f\x8b"
    blanks = run_without_ray(str(tmp_path / "in"), str(tmp_path / "out"))
    assert blanks == sum(e.blank for e in builder.expected)
    check_run(str(tmp_path / "out"), builder.expected)  # line numbers: the decompressed text's


@pytest.mark.parametrize("keep", [0.5, 0.999, 0.01])
def test_truncated_gzip_keeps_what_was_decoded_and_ends_in_one_error_row(tmp_path, keep):
    builder = _small_input()
    cut, expected = truncated_gzip(builder, "a.jsonl", keep)
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.jsonl").write_bytes(cut)
    run_without_ray(str(tmp_path / "in"), str(tmp_path / "out"))
    check_run(str(tmp_path / "out"), expected)
    last = read_jsonl(str(tmp_path / "out" / "errors.jsonl"))[-1]["error"]
    assert last["line"] == expected[-1].line and "gzip stream is damaged" in last["message"]


def _lines_of(data: bytes) -> list:
    return list(shard_lines(io.BytesIO(data), MAX_LINE_BYTES))


def test_damaged_gzip_streams_end_in_one_unreadable_line():
    data = b"".join(dumps({"custom_id": f"r{i}", "body": chat("y" * (i % 50))}) + b"\n" for i in range(20_000))
    packed = gzip.compress(data, mtime=0)
    whole = _lines_of(packed)
    assert len(whole) == 20_000 and all(raw and not raw.startswith(UNREADABLE) for _, raw in whole)
    flipped = bytearray(packed)
    flipped[len(packed) // 2] ^= 0xFF
    cases = {
        "header only": packed[:10],
        "no trailer": packed[:-8],
        "trailing garbage": packed + b"garbage",
        "bit flip": bytes(flipped),
        "not gzip after the magic": b"\x1f\x8b" + b"x" * 100,
    }
    for name, damaged in cases.items():
        lines = _lines_of(damaged)
        numbers = [n for n, _ in lines]
        assert numbers == list(range(1, len(lines) + 1)), name  # each line once, in order
        assert lines[-1][1].startswith(UNREADABLE), name
        assert not any(raw is not None and raw.startswith(UNREADABLE) for _, raw in lines[:-1]), name
        assert error_of(lines[-1][1])[:2] == ("invalid_json", None), name
    assert len(_lines_of(packed + b"garbage")) == 20_001  # every line, then the damage
    assert _lines_of(gzip.compress(b"")) == [] and _lines_of(b"") == []


def test_a_plain_file_that_only_looks_like_gzip_for_one_byte():
    assert _lines_of(b"\x1f\n") == [(1, b"\x1f")]
    assert error_of(b"\x1f")[0] == "invalid_json"


# ------------------------------------------------------- 9. 1,000 tiny shards + a large one


def test_thousand_tiny_shards_and_a_large_one(tmp_path):
    builder = many_shards(tiny=1000, large_lines=5000)
    started = time.process_time()
    rows = run_and_check(builder, tmp_path)
    used = time.process_time() - started
    assert len(rows) == 5000 - 50 + 999
    assert used < 60, f"{used:.1f} s of CPU"  # about 3 s: nothing is quadratic in shards


def test_reading_shards_is_linear_in_their_number(tmp_path):
    """Each shard is opened once and yields its own tables: no per-shard work scales with
    the number of shards (timed: 4x the shards may take at most ~4x the time, with room)."""
    def timed(count: int) -> float:
        folder = tmp_path / f"in-{count}"
        folder.mkdir()
        for i in range(count):
            (folder / f"{i:05d}.jsonl").write_bytes(dumps({"custom_id": f"{i}", "body": chat("x")}) + b"\n")
        table = _shard_table(str(folder))
        started = time.process_time()
        tables = list(read_shards(table, max_line_bytes=MAX_LINE_BYTES))
        used = time.process_time() - started
        assert len(tables) == count and all(t.num_rows == 1 for t in tables)
        return used

    small, large = timed(500), timed(2000)
    assert large < 10 * max(small, 0.05), (small, large)


def test_skip_sets_keep_the_read_linear(tmp_path):
    builder = many_shards(tiny=200, large_lines=2000)
    builder.write(str(tmp_path / "in"))
    skip: dict = {}
    for e in builder.expected[::2]:
        skip.setdefault(e.shard, LineSet()).add(e.line)
    tables = list(read_shards(_shard_table(str(tmp_path / "in")), max_line_bytes=MAX_LINE_BYTES, skip=skip))
    got = {(s, n) for t in tables for s, n in zip(column(t, "shard"), column(t, "line"))}
    assert got == {(e.shard, e.line) for e in builder.expected[1::2]}


# ------------------------------------------------------------- mixed in one line, in short


def test_prepare_requests_accounts_for_every_line_once():
    raws = []
    expected = []
    for n, kind in enumerate(BAD_KINDS):
        raw, echoed, code = bad_line(kind, f"k{n}", earlier="k0")
        raw = raw if isinstance(raw, bytes) else dumps(raw)
        if code == "line_too_large":
            raw = None
        raws.append(raw)
        if code is not None and kind != "duplicate_custom_id":  # duplicates need the scan
            expected.append((n + 1, echoed, code))
        elif kind == "duplicate_custom_id":
            expected.append((n + 1, "k0", None))  # without the scan's verdict: answered
    rows = prepared(raws, MAX_LINE_BYTES)
    assert [(r["line"], r["custom_id"], r["error_code"]) for r in rows] == expected
    assert all((r["request"] is None) == (r["error_code"] is not None) for r in rows)
    assert all(json.loads(r["request"])["custom_id"] == r["custom_id"] for r in rows if r["request"])
