"""Hostile inputs, shared by tests/unit/test_hostile_input.py (no Ray) and
tests/integration/test_hostile_input_run.py (whole runs): each builder says what every
line must become, in the `InputBuilder`/`Expected` terms `check_run` holds a run to."""

from __future__ import annotations

import gzip
import json
import zlib
from pathlib import Path

from tests.helpers import Expected, InputBuilder

MAX_LINE_BYTES = 16 * 1024  # above every line with a custom_id below, below the too-large lines

# custom_ids that are only strings: answered, and echoed back byte for byte. The longest
# is exactly at the default limit (512 bytes); one byte more is custom_id_too_long.
HOSTILE_CUSTOM_IDS = (
    "x" * 512,
    "../../x",
    "/etc/passwd",
    "a\u0000b",
    "\u202eexe.txt",
    " ",
    "😀",
)


def chat(text: str) -> dict:
    return {"messages": [{"role": "user", "content": text}]}


def bad_line(kind: str, custom_id: str, earlier: str, max_line_bytes: int = MAX_LINE_BYTES):
    """One bad line of `kind`: (raw line, custom_id echoed, error code; None: blank).
    `earlier` is a custom_id an earlier line of the input holds."""
    cid = custom_id.encode()
    return {
        "invalid_json": (b'{"custom_id": "' + cid + b'", "body": {', None, "invalid_json"),
        "invalid_utf8": (b'{"custom_id": "' + cid + b'\xff", "body": {}}', None, "invalid_json"),
        "lone_surrogate": (b'{"custom_id": "\\ud800", "body": {"messages": []}}', None, "invalid_json"),
        "too_deep": (b'{"custom_id": "' + cid + b'", "body": ' + b"[" * 100 + b"]" * 100 + b"}", None, "invalid_json"),
        "huge_integer": (b'{"custom_id": "' + cid + b'", "body": {"n": ' + b"9" * 5000 + b"}}", None, "invalid_json"),
        "not_an_object": ([custom_id, chat("hi")], None, "invalid_request"),
        "missing_custom_id": ({"body": chat("hi")}, None, "missing_custom_id"),
        "empty_custom_id": ({"custom_id": "", "body": chat("hi")}, None, "missing_custom_id"),
        "non_string_custom_id": ({"custom_id": 7, "body": chat("hi")}, None, "missing_custom_id"),
        "missing_body": ({"custom_id": custom_id}, custom_id, "invalid_request"),
        "invalid_body": ({"custom_id": custom_id, "body": {"messages": []}}, custom_id, "invalid_request"),
        "unknown_url": ({"custom_id": custom_id, "url": "/v1/moderations", "body": chat("hi")}, custom_id, "invalid_request"),
        "duplicate_custom_id": ({"custom_id": earlier, "body": chat("again")}, earlier, "duplicate_custom_id"),
        "line_too_large": ({"custom_id": custom_id, "body": chat("x" * max_line_bytes)}, None, "line_too_large"),
        "blank": (b"  \t", None, None),
    }[kind]


BAD_KINDS = (
    "invalid_json", "invalid_utf8", "lone_surrogate", "too_deep", "huge_integer", "not_an_object",
    "missing_custom_id", "empty_custom_id", "non_string_custom_id", "missing_body", "invalid_body",
    "unknown_url", "duplicate_custom_id", "line_too_large", "blank",
)


def add_bad(builder: InputBuilder, shard: str, kind: str, custom_id: str, earlier: str) -> None:
    raw, echoed, code = bad_line(kind, custom_id, earlier)
    builder.add(shard, raw, echoed, code, blank=code is None)


def one_percent_bad(
    shard: str = "in.jsonl", lines: int = 10_000, builder: InputBuilder = None, hostile_ids=HOSTILE_CUSTOM_IDS
) -> InputBuilder:
    """`lines` lines, 1% of them bad (line 51, 151, ...: every kind in turn), the rest
    good; the good line 11 of each of the first hundreds holds one of `hostile_ids`
    (custom_ids are input-wide: give them to one shard of an input only)."""
    builder = builder or InputBuilder()
    hostile = iter(hostile_ids)
    earlier = None
    for i in range(lines):
        custom_id = f"{shard}:{i:05d}"
        if i % 100 == 50:
            add_bad(builder, shard, BAD_KINDS[(i // 100) % len(BAD_KINDS)], custom_id, earlier)
            continue
        if i % 100 == 10:
            custom_id = next(hostile, custom_id)
        builder.ok(shard, custom_id, chat(f"line {i}"))
        earlier = custom_id
    return builder


def only_bad(shard: str = "bad.jsonl") -> InputBuilder:
    """Every bad kind once, and no good line: the duplicate repeats a bad line's custom_id
    (the first claim wins even when that line is itself an error)."""
    builder = InputBuilder()
    first_claim = f"bad-{BAD_KINDS.index('missing_body')}"
    for n, kind in enumerate(BAD_KINDS):
        add_bad(builder, shard, kind, f"bad-{n}", earlier=first_claim)
    return builder


def many_shards(tiny: int = 1000, large_lines: int = 5000) -> InputBuilder:
    """One large shard (1% bad) and `tiny` one-line shards; one tiny line repeats a
    custom_id of the large shard, which sorts first."""
    builder = one_percent_bad("large.jsonl", large_lines)
    for i in range(tiny):
        shard = f"tiny/{i:04d}.jsonl"
        if i == tiny // 2:
            add_bad(builder, shard, "duplicate_custom_id", "", earlier="large.jsonl:00000")
        else:
            builder.ok(shard, f"tiny-{i}", chat(f"tiny {i}"))
    return builder


def write_gzipped(builder: InputBuilder, folder: Path) -> None:
    """Each shard gzip-compressed, still named .jsonl; a shard named *multi* as two members."""
    for name, lines in builder.shards.items():
        data = b"".join(lines)
        half = len(data) // 2
        parts = (data[:half], data[half:]) if "multi" in name else (data,)
        packed = b"".join(gzip.compress(part, mtime=0) for part in parts)
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(packed)


def truncated_gzip(builder: InputBuilder, shard: str, keep: float) -> tuple[bytes, list[Expected]]:
    """The shard gzip-compressed and cut after `keep` of its bytes, and what its lines
    must become: the lines decoded whole before the cut as built, then one invalid_json
    row at the first line the stream could not deliver."""
    packed = gzip.compress(b"".join(builder.shards[shard]), mtime=0)
    cut = packed[: int(len(packed) * keep)]
    delivered = zlib.decompressobj(wbits=31).decompress(cut).count(b"\n")
    expected = [e for e in builder.expected if e.shard == shard and e.line <= delivered]
    return cut, expected + [Expected(shard, delivered + 1, None, "invalid_json")]


def dumps(value) -> bytes:
    return json.dumps(value).encode()
