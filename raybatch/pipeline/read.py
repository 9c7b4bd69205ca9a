"""Stage 1 — read: stream the input shards as lines, each keeping its (shard, line).

The read stage is a generator over shards: a task opens one shard and yields batches
of lines as it goes, so no shard is ever held whole in memory, and a line longer than
the limit is skipped over in bounded chunks rather than loaded. A gzip-compressed shard
is read through gzip whatever its name, and a damaged one ends in an unreadable line
rather than failing the task.
"""

from __future__ import annotations

import gzip
import io
import zlib
from typing import IO, Callable, Iterator, Optional

import pyarrow as pa

from raybatch.exceptions import InputTooLarge
from raybatch.pipeline.rows import RAW_SCHEMA, column
from raybatch.storage import Shard, open_shard

UTF8_BOM = b"\xef\xbb\xbf"
LINES_PER_BATCH = 1024
_DRAIN_CHUNK = 1 << 20
GZIP_MAGIC = b"\x1f\x8b"  # a JSONL file cannot start so: 0x1f is no JSON, 0x8b no UTF-8 start
# What a damaged gzip stream raises: a bad header, CRC or trailing data; an early end;
# bad deflate data. Not OSError at large: a failed storage read must fail the task, to
# be retried, rather than become an error row.
_GZIP_DAMAGE = (gzip.BadGzipFile, EOFError, zlib.error)
# A line the reader could not decode travels as its reason behind this marker. A real
# line never holds b"\n" (it ends lines), so the marker cannot be mistaken for input,
# and the rows need no column that is null on every other line.
UNREADABLE = b"\n"


def _line_reader(handle: IO[bytes]) -> IO[bytes]:
    """`handle`, or a wrapper of it, whose readline honours its size limit.

    fsspec's buffered files ignore the limit; io.BufferedReader honours it, and so does
    GzipFile, which reads through a small BufferedReader of its own: wrapping it in a
    large one would lose up to a buffer of decoded lines when the stream turns out damaged.
    """
    if isinstance(handle, (io.BufferedReader, gzip.GzipFile)):
        return handle
    return io.BufferedReader(handle, 1 << 20)


def _too_large(name: str, limit: int) -> InputTooLarge:
    return InputTooLarge(
        f"input shard {name} expands to more than {limit} bytes, the input size limit "
        "(a gzip shard counts decompressed); nothing past the limit was read"
    )


def iter_lines(
    handle: IO[bytes], max_line_bytes: int, max_total_bytes: Optional[int] = None, name: str = ""
) -> Iterator[tuple[int, Optional[bytes]]]:
    """Yield (1-based line number, line without its line end) for every line.

    A line longer than `max_line_bytes` yields None instead of its bytes. CRLF ends and
    a UTF-8 BOM at the start of the file are removed. Past `max_total_bytes` read (of
    `handle`, i.e. decompressed for gzip) it raises InputTooLarge, naming `name`.
    """
    reader = _line_reader(handle)
    line_number = 0
    consumed = 0
    limit = max_total_bytes if max_total_bytes is not None else float("inf")
    while True:
        chunk = reader.readline(max_line_bytes + 2)  # room for "\r\n"
        if not chunk:
            return
        consumed += len(chunk)
        if consumed > limit:
            raise _too_large(name, max_total_bytes)
        line_number += 1
        complete = chunk.endswith(b"\n") or len(chunk) < max_line_bytes + 2
        while not chunk.endswith(b"\n") and not complete:
            # Too long: skip the rest of the line without holding it.
            chunk = reader.readline(_DRAIN_CHUNK)
            consumed += len(chunk)
            if consumed > limit:
                raise _too_large(name, max_total_bytes)
            if not chunk:
                break
        if not complete:
            yield line_number, None
            continue
        if chunk.endswith(b"\n"):
            chunk = chunk[:-1]
        if chunk.endswith(b"\r"):
            chunk = chunk[:-1]
        if line_number == 1 and chunk.startswith(UTF8_BOM):
            chunk = chunk[len(UTF8_BOM):]
        yield line_number, (chunk if len(chunk) <= max_line_bytes else None)


def _decompressed(reader: IO[bytes]) -> IO[bytes]:
    """`reader` itself, or a gzip stream over it if it starts with gzip's magic bytes."""
    if reader.peek(len(GZIP_MAGIC))[: len(GZIP_MAGIC)] != GZIP_MAGIC:
        return reader
    return gzip.GzipFile(fileobj=reader, mode="rb")


def expanded_size(handle: IO[bytes], limit: int, on_read: Optional[Callable[[int], None]] = None) -> int:
    """Bytes the shard in `handle` expands to (decompressed if gzip), counted in 1 MiB
    reads and given up as soon as they pass `limit` (the result is then > limit): a
    bomb is refused after reading just past the limit, not after expanding whole. A
    damaged gzip stream counts what it delivered; the job reports the damage as a row.
    `on_read` hears the running count after each read."""
    stream = _decompressed(_line_reader(handle))
    total = 0
    try:
        while total <= limit and (chunk := stream.read(_DRAIN_CHUNK)):
            total += len(chunk)
            if on_read is not None:
                on_read(total)
    except _GZIP_DAMAGE:
        pass
    return total


def shard_lines(
    handle: IO[bytes], max_line_bytes: int, max_total_bytes: Optional[int] = None, name: str = ""
) -> Iterator[tuple[int, Optional[bytes]]]:
    """`iter_lines` of one shard, decompressed first if it starts with gzip's magic bytes
    (line numbers are then those of the decompressed text).

    A damaged gzip stream ends the shard with one UNREADABLE line, numbered as the first
    line it could not deliver: past the damage there are no lines to tell apart. Damage
    that deflate itself does not notice shows only in the CRC at the stream's end, so the
    lines decoded before it have been yielded as they came out.
    """
    reader = _line_reader(handle)
    stream = _decompressed(reader)
    if stream is reader:
        yield from iter_lines(reader, max_line_bytes, max_total_bytes, name)
        return
    line_number = 0
    try:
        for line_number, raw in iter_lines(stream, max_line_bytes, max_total_bytes, name):
            yield line_number, raw
    except _GZIP_DAMAGE as exc:
        reason = f"the shard's gzip stream is damaged ({exc}): this line and the rest of the shard cannot be read"
        yield line_number + 1, UNREADABLE + reason.encode()


def read_shards(
    batch: pa.Table,
    *,
    max_line_bytes: int,
    skip: Optional[dict[str, "LineSet"]] = None,
    max_shard_bytes: Optional[int] = None,
) -> Iterator[pa.Table]:
    """Ray Data generator UDF: a batch of shard descriptions in, batches of lines out.

    Columns out: `shard` (name), `line` (1-based), `raw` (bytes; None if too large,
    UNREADABLE and the reason if it could not be decoded). Lines in `skip[shard]`
    (committed by an earlier run) are left out. A shard expanding past
    `max_shard_bytes` raises InputTooLarge: the whole run stops, since a shard cut
    short would leave its later lines in neither file.
    """
    skip = skip or {}
    for url, name, size in zip(column(batch, "url"), column(batch, "name"), column(batch, "size")):
        done = skip.get(name)
        shards, lines, raws = [], [], []
        with open_shard(Shard(str(url), str(name), int(size))) as handle:
            for line_number, raw in shard_lines(handle, max_line_bytes, max_shard_bytes, str(name)):
                if done is not None and line_number in done:
                    continue
                shards.append(str(name))
                lines.append(line_number)
                raws.append(raw)
                if len(lines) >= LINES_PER_BATCH:
                    yield _table(shards, lines, raws)
                    shards, lines, raws = [], [], []
        if lines:
            yield _table(shards, lines, raws)


def _table(shards: list, lines: list, raws: list) -> pa.Table:
    return pa.Table.from_pydict({"shard": shards, "line": lines, "raw": raws}, schema=RAW_SCHEMA)


class LineSet:
    """A set of line numbers of one shard, one bit each, for the lines a run skips."""

    def __init__(self) -> None:
        self._bits = bytearray()

    def add(self, line: int) -> None:
        byte, bit = divmod(line, 8)
        if byte >= len(self._bits):
            self._bits.extend(b"\0" * (byte + 1 - len(self._bits)))
        self._bits[byte] |= 1 << bit

    def __contains__(self, line: int) -> bool:
        byte, bit = divmod(line, 8)
        return byte < len(self._bits) and bool(self._bits[byte] & (1 << bit))

    def __len__(self) -> int:
        return sum(bin(b).count("1") for b in self._bits)
