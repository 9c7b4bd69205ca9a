"""Stage 2 — validate: turn each raw line into a request or an error row.

Every check here is per line and pure, so a bad line costs one error row and nothing
else. The order of the checks decides which code a line with several faults gets:
size, encoding, JSON, shape, custom_id, duplicate, url, body, bounds (the job's limits
on expensive rows: max_tokens, n, logprobs, json_schema size, each with its own code).

Parsing also refuses JSON that Python reads but later stages could not carry (deep
nesting, lone surrogates): such a line must fail here, as a row, rather than fail a
worker further on.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional, Union

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import ValidationError

from raybatch.exceptions import RowError
from raybatch.pipeline.embeddings import check_url_for_task
from raybatch.pipeline.read import UNREADABLE
from raybatch.pipeline.rows import CUSTOM_ID_DIGEST_BYTES, SCAN_SCHEMA, column
from raybatch.protocol import (
    CHAT_URL,
    COMPLETIONS_URL,
    DEFAULT_MAX_CUSTOM_ID_BYTES,
    DEFAULT_MAX_JSON_SCHEMA_BYTES,
    DEFAULT_MAX_OUTPUT_TOKENS,
    DEFAULT_MAX_TOP_LOGPROBS,
    EMBEDDINGS_URL,
    SUPPORTED_URLS,
    BatchInputLine,
    ChatCompletionBody,
    CompletionBody,
    EmbeddingBody,
    ErrorCode,
)

Body = Union[ChatCompletionBody, CompletionBody, EmbeddingBody]

# Levels of arrays and objects a line may nest, the line itself being the first. Real
# requests need a handful, a json_schema some dozens. Deeper ones would pass here and
# fail a worker later: pydantic writes JSON only ~250 levels deep and reads it ~200 (the
# engine stage reads each request back). A fixed limit also keeps the outcome apart from
# the stack depth json.loads happens to have left.
MAX_NESTING = 64
# json.loads turns an escape of a lone UTF-16 surrogate (\ud800-\udfff, unpaired) into a
# str that is no Unicode text: UTF-8 cannot encode it, so neither Arrow nor the output
# files can hold it.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
_SURROGATE = re.compile("[\ud800-\udfff]")


@dataclass
class ValidatedRequest:
    custom_id: str
    url: str
    body: Body


def is_blank(raw: Optional[bytes]) -> bool:
    return raw is not None and not raw.strip()


def _too_deep() -> RowError:
    return RowError(ErrorCode.INVALID_JSON, f"line is nested deeper than {MAX_NESTING} levels")


def _check_parsed(parsed: Any, text: str) -> None:
    """Refuse nesting past MAX_NESTING and lone surrogates. The walk goes level by level,
    without recursion, and only when the text could hold either: more than MAX_NESTING
    brackets, or a surrogate escape. Most lines hold neither and cost two counts."""
    strings = _SURROGATE_ESCAPE.search(text) is not None
    if not strings and text.count("[") + text.count("{") <= MAX_NESTING:
        return
    level, depth = ([parsed] if isinstance(parsed, (dict, list)) else []), 1
    while level:
        if depth > MAX_NESTING:
            raise _too_deep()
        below = []
        for value in level:
            for child in [*value, *value.values()] if isinstance(value, dict) else value:
                if isinstance(child, (dict, list)):
                    below.append(child)
                elif strings and isinstance(child, str) and _SURROGATE.search(child):
                    raise RowError(
                        ErrorCode.INVALID_JSON, "line holds a lone UTF-16 surrogate escape (\\ud800-\\udfff)"
                    )
        level, depth = below, depth + 1


def parse_json_line(raw: Optional[bytes], max_line_bytes: int) -> Any:
    """Decode one line. Raises RowError for an oversized, unreadable, non-UTF-8 or
    non-JSON line, and for JSON that later stages could not carry."""
    if raw is None:
        raise RowError(
            ErrorCode.LINE_TOO_LARGE, f"line is longer than the limit of {max_line_bytes} bytes"
        )
    if raw.startswith(UNREADABLE):
        raise RowError(ErrorCode.INVALID_JSON, raw[len(UNREADABLE):].decode())
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RowError(
            ErrorCode.INVALID_JSON, f"line is not valid UTF-8: {exc.reason} at byte {exc.start}"
        ) from None
    try:
        parsed = json.loads(text)
    except RecursionError:  # past ~1000 levels, before MAX_NESTING can be checked
        raise _too_deep() from None
    except json.JSONDecodeError as exc:
        raise RowError(ErrorCode.INVALID_JSON, f"line is not valid JSON: {exc}") from None
    except ValueError:  # int() refuses integers past Python's digit limit (4300)
        raise RowError(ErrorCode.INVALID_JSON, "line holds an integer with too many digits") from None
    _check_parsed(parsed, text)
    return parsed


def readable_custom_id(parsed: Any) -> Optional[str]:
    """The line's custom_id if it is a non-empty string, else None."""
    if isinstance(parsed, dict):
        custom_id = parsed.get("custom_id")
        if isinstance(custom_id, str) and custom_id:
            return custom_id
    return None


def custom_id_too_long(custom_id: str, max_custom_id_bytes: int) -> Optional[RowError]:
    """The error of a custom_id past the limit, else None. The id is not attached: a
    row echoes its custom_id into the output, and a 1 MB id would be echoed whole."""
    size = len(custom_id.encode("utf-8"))
    if size <= max_custom_id_bytes:
        return None
    return RowError(
        ErrorCode.CUSTOM_ID_TOO_LONG,
        f"custom_id is {size} bytes, over the limit of {max_custom_id_bytes}; it is not echoed",
    )


def custom_id_digest(custom_id: str) -> bytes:
    """A fixed-size stand-in for a custom_id in the duplicate scan. 128 bits: two
    different ids of one input share a digest with probability ~n²/2¹²⁹, nil in practice
    (1e-25 for 10 M lines), and a collision could only mark a line duplicate, never lose it."""
    return hashlib.blake2b(custom_id.encode("utf-8"), digest_size=CUSTOM_ID_DIGEST_BYTES).digest()


def _describe(error: ValidationError) -> str:
    problems = []
    for item in error.errors(include_url=False)[:3]:
        where = ".".join(str(part) for part in item["loc"]) or "body"
        problems.append(f"{where}: {item['msg']}")
    return "; ".join(problems)


def check_row_bounds(
    body: Body,
    *,
    max_n: int,
    max_output_tokens: int = DEFAULT_MAX_OUTPUT_TOKENS,
    max_top_logprobs: int = DEFAULT_MAX_TOP_LOGPROBS,
    max_json_schema_bytes: int = DEFAULT_MAX_JSON_SCHEMA_BYTES,
) -> None:
    """Refuse a valid body that asks for more than the job allows (RunConfig's bounds on
    expensive rows). Raises RowError with the bound's own code."""
    if body.n is not None and body.n > max_n:
        raise RowError(ErrorCode.N_TOO_LARGE, f"n must be at most {max_n}; this request asks for {body.n}")
    for name in ("max_tokens", "max_completion_tokens", "min_tokens"):
        value = getattr(body, name)
        if value is not None and value > max_output_tokens:
            raise RowError(
                ErrorCode.MAX_TOKENS_TOO_LARGE,
                f"{name} must be at most {max_output_tokens}, this job's limit; this request asks for {value}",
            )
    if isinstance(body, ChatCompletionBody):
        name, alternatives = "top_logprobs", body.top_logprobs if body.logprobs else None
    else:
        name, alternatives = "logprobs", body.logprobs
    if alternatives is not None and alternatives > max_top_logprobs:
        raise RowError(
            ErrorCode.LOGPROBS_TOO_LARGE,
            f"{name} must be at most {max_top_logprobs}, this job's limit; this request asks for {alternatives}",
        )
    response_format = body.response_format
    schemas = {}
    if response_format is not None and response_format.json_schema is not None:
        schemas["json_schema is"] = response_format.json_schema.schema_
    if isinstance(body, ChatCompletionBody) and body.tools and body.tool_choice != "none":
        # The tools' parameter schemas become the tool-call grammar, compiled as one.
        schemas["tools' parameter schemas are"] = [tool.function.parameters for tool in body.tools]
    for what, schema in schemas.items():
        # Compact, as the engine receives it: spacing in the line costs nothing.
        size = len(json.dumps(schema, separators=(",", ":"), ensure_ascii=False).encode())
        if size > max_json_schema_bytes:
            raise RowError(
                ErrorCode.JSON_SCHEMA_TOO_LARGE,
                f"{what} {size} bytes, over this job's limit of {max_json_schema_bytes}",
            )


def validate_body(url: str, body: dict[str, Any], *, max_n: int, **bounds: int) -> Body:
    """Validate a (merged) request body for its endpoint, then the job's bounds on
    expensive rows (`check_row_bounds`; `bounds` are its limits other than max_n).
    Raises RowError."""
    model = {CHAT_URL: ChatCompletionBody, EMBEDDINGS_URL: EmbeddingBody}.get(url, CompletionBody)
    try:
        validated = model.model_validate(body)
    except ValidationError as exc:
        raise RowError(ErrorCode.INVALID_REQUEST, f"invalid body: {_describe(exc)}") from None
    if not isinstance(validated, EmbeddingBody):  # the bounds are on generation
        check_row_bounds(validated, max_n=max_n, **bounds)
    return validated


def validate_line(
    raw: Optional[bytes],
    *,
    max_line_bytes: int,
    max_n: int,
    job_defaults: dict[str, Any],
    is_duplicate: bool = False,
    max_custom_id_bytes: int = DEFAULT_MAX_CUSTOM_ID_BYTES,
    task: str = "generate",
    **bounds: int,
) -> ValidatedRequest:
    """Check one line. Raises RowError (with the custom_id attached when readable and
    within its length limit). `task`: what the job's model answers (EngineConfig.task).
    `bounds`: the job's limits on expensive rows other than max_n (`check_row_bounds`)."""
    parsed = parse_json_line(raw, max_line_bytes)
    if not isinstance(parsed, dict):
        raise RowError(ErrorCode.INVALID_REQUEST, "line must be a JSON object")
    custom_id = readable_custom_id(parsed)
    if custom_id is None:
        raise RowError(ErrorCode.MISSING_CUSTOM_ID, "custom_id must be a non-empty string")
    too_long = custom_id_too_long(custom_id, max_custom_id_bytes)
    if too_long:
        raise too_long
    try:
        if is_duplicate:
            raise RowError(
                ErrorCode.DUPLICATE_CUSTOM_ID,
                f"custom_id {custom_id!r} appears earlier in the input; the first one is used",
            )
        try:
            line = BatchInputLine.model_validate(parsed)
        except ValidationError as exc:
            raise RowError(ErrorCode.INVALID_REQUEST, _describe(exc)) from None
        if line.url not in SUPPORTED_URLS:
            raise RowError(
                ErrorCode.INVALID_REQUEST,
                f"unsupported url {line.url!r}; use {CHAT_URL}, {COMPLETIONS_URL} or {EMBEDDINGS_URL}",
            )
        check_url_for_task(line.url, task)
        merged = {**job_defaults, **line.body}
        return ValidatedRequest(custom_id, line.url, validate_body(line.url, merged, max_n=max_n, **bounds))
    except RowError as error:
        error.custom_id = custom_id
        raise


# A line whose first key is "custom_id" with a plain string value (no escapes, no
# control characters): the input scan reads the id off it without parsing the line.
_LEADING_CUSTOM_ID = re.compile(rb'[ \t\r\n]*\{[ \t\r\n]*"custom_id"[ \t\r\n]*:[ \t\r\n]*"([^"\\\x00-\x1f]*)"')
# An escape that could spell a letter of "custom_id" (\u005f, \u006X, \u007X): a second
# key so written would override the first, as json.loads keeps a repeated key's last value.
_KEY_LETTER_ESCAPE = re.compile(rb"\\u00[5-7]")


def leading_custom_id(raw: bytes) -> Optional[bytes]:
    """The custom_id of a line whose first key is "custom_id" with a plain string value
    and that names no other key "custom_id", as UTF-8, read without parsing the line;
    None when that cannot be told so (then the line must be parsed). It is the id
    json.loads would find, if the line is valid JSON at all: only parsing tells that."""
    found = _LEADING_CUSTOM_ID.match(raw)
    if found is None or raw.count(b'"custom_id"') != 1 or _KEY_LETTER_ESCAPE.search(raw):
        return None
    return found.group(1)


def _claim(raw: Optional[bytes], max_line_bytes: int, max_custom_id_bytes: int) -> tuple[Optional[bytes], bool]:
    """(digest of the custom_id the line claims or None, whether it was read without
    parsing the line). Parsing it costs as much as validating it does later; most lines
    start with their custom_id, and are parsed only once, by validate."""
    if raw is not None and not raw.startswith(UNREADABLE):
        leading = leading_custom_id(raw)
        if leading is not None:
            if not leading or len(leading) > max_custom_id_bytes:
                return None, False  # empty or too long: no claim, valid line or not
            return hashlib.blake2b(leading, digest_size=CUSTOM_ID_DIGEST_BYTES).digest(), True
    try:
        custom_id = readable_custom_id(parse_json_line(raw, max_line_bytes))
    except RowError:
        custom_id = None
    if custom_id is not None and custom_id_too_long(custom_id, max_custom_id_bytes) is None:
        return custom_id_digest(custom_id), False
    return None, False


def scan_custom_ids(
    batch: pa.Table, *, max_line_bytes: int, max_custom_id_bytes: int = DEFAULT_MAX_CUSTOM_ID_BYTES
) -> pa.Table:
    """Ray Data UDF of the input scan: which custom_id each line claims (as its digest;
    null for a line whose id is missing, unreadable or too long: it claims nothing, it
    is an error row), and which lines are blank. The scan runs before the main pass so
    that "the first occurrence wins" holds whatever order the parallel main pass reaches
    the lines in. A line that starts with its custom_id is not parsed here (`unparsed`):
    `DuplicateScan.duplicates` asks for the few such lines whose validity decides
    another line's fate (`claims_among`)."""
    digests, blanks, unparsed = [], [], []
    for raw in column(batch, "raw"):
        blank = is_blank(raw)
        digest, leading = (None, False) if blank else _claim(raw, max_line_bytes, max_custom_id_bytes)
        digests.append(digest)
        blanks.append(blank)
        unparsed.append(leading)
    return pa.Table.from_pydict(
        {
            "shard": column(batch, "shard"),
            "line": column(batch, "line"),
            "custom_id_digest": digests,
            "blank": blanks,
            "unparsed": unparsed,
        },
        schema=SCAN_SCHEMA,
    )


def claims_among(
    batches: Iterable[pa.Table],
    wanted: set[tuple[str, int]],
    *,
    max_line_bytes: int,
    max_custom_id_bytes: int = DEFAULT_MAX_CUSTOM_ID_BYTES,
) -> set[tuple[str, int]]:
    """Of the `wanted` (shard, line)s, those whose line, parsed, claims a custom_id.
    `batches`: read-stage batches holding at least those lines."""
    found = set()
    for batch in batches:
        for shard, line, raw in zip(column(batch, "shard"), column(batch, "line"), column(batch, "raw")):
            if (shard, line) in wanted and not is_blank(raw):
                try:
                    custom_id = readable_custom_id(parse_json_line(raw, max_line_bytes))
                except RowError:
                    continue
                if custom_id is not None and custom_id_too_long(custom_id, max_custom_id_bytes) is None:
                    found.add((shard, line))
    return found


class DuplicateScan:
    """The driver's side of the input scan: counts lines and finds every line whose
    custom_id an earlier line (in shard-then-line order) already claimed.

    A claim is 24 bytes (its 16-byte digest and its position), whatever the length of
    its id. Its memory does not grow with the input: past `memory_entries` claims held
    in memory, they are appended to 256 files in a temporary folder, by the digest's
    first byte, so every claim of one custom_id lands in the same file; `duplicates()`
    then sorts one file at a time (a file still past the budget, on a huge input, is
    split again by the next byte). At most about 3 × 24 × `memory_entries` bytes (the
    sort's copies), ~19 MB by default. Use it as a context manager, or call
    `duplicates()`: either removes the folder, also on error.
    """

    _LINE_BITS = 40  # a position is shard index << 40 | line number
    _UNPARSED = np.uint64(1 << 63)  # set in a position: its claim was read off an unparsed line
    _BUCKETS = 256  # one per value of a digest byte
    DEFAULT_MEMORY_ENTRIES = 1 << 18  # 6 MB of claims: small next to the driver itself

    def __init__(self, shard_names: list[str], *, memory_entries: Optional[int] = None, spill_dir=None):
        self._names = list(shard_names)
        self._index = {name: i for i, name in enumerate(self._names)}
        self._memory_entries = max(1, memory_entries or self.DEFAULT_MEMORY_ENTRIES)
        self._spill_dir = spill_dir  # where the temporary folder goes (None: the system's)
        self._chunks: list[np.ndarray] = []  # (k, 3) u64: digest (2 words), position
        self._held = 0  # claims in self._chunks
        self._spill: Optional[tempfile.TemporaryDirectory] = None  # made at the first spill
        self.lines = 0  # non-blank lines: the job's totalInputRequests
        self.blank_lines = 0
        # Claims of digests whose first claim was read off an unparsed line that may not
        # be JSON at all: settled by `confirm` at the end (only where a digest repeats).
        self._doubtful: list[np.ndarray] = []

    def __enter__(self) -> "DuplicateScan":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def close(self) -> None:
        """Drop what is held and remove the spill folder, if any."""
        self._chunks, self._held, self._doubtful = [], 0, []
        if self._spill is not None:
            self._spill.cleanup()
            self._spill = None

    def add(self, batch: pa.Table) -> None:
        """One batch of `scan_custom_ids` output."""
        blank = batch["blank"].to_numpy(zero_copy_only=False)
        self.blank_lines += int(blank.sum())
        self.lines += len(blank) - int(blank.sum())
        claimed = batch.filter(pc.is_valid(batch["custom_id_digest"]))
        if claimed.num_rows == 0:
            return
        digests = np.frombuffer(b"".join(claimed["custom_id_digest"].to_pylist()), dtype=np.uint64)
        shards = np.array([self._index[s] for s in claimed["shard"].to_pylist()], dtype=np.uint64)
        lines = claimed["line"].to_numpy().astype(np.uint64)
        positions = (shards << np.uint64(self._LINE_BITS)) | lines
        if "unparsed" in claimed.column_names:
            unparsed = claimed["unparsed"].fill_null(False).to_numpy(zero_copy_only=False)
            positions[unparsed] |= self._UNPARSED
        self._chunks.append(np.column_stack((digests.reshape(-1, 2), positions)))
        self._held += claimed.num_rows
        if self._held >= self._memory_entries:
            if self._spill is None:
                self._spill = tempfile.TemporaryDirectory(prefix="raybatch-scan-", dir=self._spill_dir)
            self._spill_held()

    def duplicates(
        self, confirm: Optional[Callable[[set[tuple[str, int]]], set[tuple[str, int]]]] = None
    ) -> set[tuple[str, int]]:
        """(shard name, line) of every claim that is not the first of its custom_id.

        `confirm`: given (shard, line)s of claims read off unparsed lines, those whose
        line is valid JSON (`claims_among`). Asked only about digests claimed more than
        once: nothing in an input without repeated ids, one line per repeat otherwise.
        """
        try:
            if self._spill is None:  # it all fit in memory
                found = self._later_claims(np.concatenate(self._chunks)) if self._chunks else set()
            else:
                self._spill_held()
                folder = self._spill.name
                found = set()
                for name in sorted(os.listdir(folder)):
                    found |= self._bucket_claims(os.path.join(folder, name), 0)
            if self._doubtful:
                found |= self._settle(np.concatenate(self._doubtful), confirm)
            return found
        finally:
            self.close()

    def _name(self, position: int) -> tuple[str, int]:
        position &= ~int(self._UNPARSED)
        return self._names[position >> self._LINE_BITS], position & ((1 << self._LINE_BITS) - 1)

    def _settle(self, entries: np.ndarray, confirm) -> set[tuple[str, int]]:
        """The later claims among `entries`: whole groups of claims of one digest, sorted,
        each with an unparsed claim. An unparsed claim counts only if `confirm` says its
        line is valid JSON; the first claim that counts wins its group."""
        same = np.zeros(len(entries), dtype=bool)
        same[1:] = (entries[1:, :2] == entries[:-1, :2]).all(axis=1)
        unparsed = (entries[:, 2] & self._UNPARSED) != 0
        wanted = {self._name(p) for p in entries[unparsed, 2].tolist()}
        if confirm is None:
            raise ValueError("DuplicateScan.duplicates needs `confirm` for claims read off unparsed lines")
        valid = confirm(wanted)
        found, winner = set(), False
        for position, is_later, is_unparsed in zip(entries[:, 2].tolist(), same.tolist(), unparsed.tolist()):
            winner = winner and is_later
            key = self._name(position)
            if is_unparsed and key not in valid:
                continue  # no claim: its line is no JSON
            if winner:
                found.add(key)
            winner = True
        return found

    def _spill_held(self) -> None:
        if self._chunks:
            entries = np.concatenate(self._chunks)
            self._chunks, self._held = [], 0
            _append_by_bucket(entries, self._spill.name, 0)

    def _bucket_claims(self, path: str, level: int) -> set[tuple[str, int]]:
        """The later claims among one bucket file's entries (then the file is removed)."""
        if os.path.getsize(path) <= 24 * self._memory_entries or level == 7:
            entries = np.fromfile(path, dtype=np.uint64).reshape(-1, 3)
            os.remove(path)
            return self._later_claims(entries)
        # Past the budget (a huge input): split it by the digest's next byte, in slices.
        folder = path + ".split"
        os.mkdir(folder)
        with open(path, "rb") as handle:
            while (part := np.fromfile(handle, dtype=np.uint64, count=3 * self._memory_entries)).size:
                _append_by_bucket(part.reshape(-1, 3), folder, level + 1)
        os.remove(path)
        found: set[tuple[str, int]] = set()
        for name in sorted(os.listdir(folder)):
            found |= self._bucket_claims(os.path.join(folder, name), level + 1)
        return found

    def _later_claims(self, entries: np.ndarray) -> set[tuple[str, int]]:
        # Sorted by digest, then position: each digest's first line leads its run.
        positions = entries[:, 2] & ~self._UNPARSED
        order = np.lexsort((positions, entries[:, 1], entries[:, 0]))
        entries, positions = entries[order], positions[order]
        later = np.zeros(len(entries), dtype=bool)
        later[1:] = (entries[1:, :2] == entries[:-1, :2]).all(axis=1)
        # A run of several claims, one of them unparsed, waits for `_settle`.
        group = np.cumsum(~later) - 1
        repeated = np.isin(group, group[later])
        doubtful = np.isin(group, group[repeated & ((entries[:, 2] & self._UNPARSED) != 0)])
        if doubtful.any():
            self._doubtful.append(entries[doubtful])
        mask = (1 << self._LINE_BITS) - 1
        return {(self._names[p >> self._LINE_BITS], p & mask) for p in positions[later & ~doubtful].tolist()}


def _append_by_bucket(entries: np.ndarray, folder: str, level: int) -> None:
    """Append (k, 3) u64 claims to folder/<b>, b being byte `level` of the digest's first
    word: a hash, so the buckets come out even, and equal digests share one."""
    bucket = ((entries[:, 0] >> np.uint64(8 * level)) & np.uint64(0xFF)).astype(np.intp)
    order = np.argsort(bucket, kind="stable")
    ends = np.cumsum(np.bincount(bucket, minlength=DuplicateScan._BUCKETS))
    entries = entries[order]
    for b, end in enumerate(ends):
        start = ends[b - 1] if b else 0
        if end > start:
            with open(os.path.join(folder, f"{b:03d}"), "ab") as handle:
                entries[start:end].tofile(handle)
