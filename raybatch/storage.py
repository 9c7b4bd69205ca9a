"""Object storage access: local folders, `file://` and `s3://` through one interface.

Everything raybatch keeps goes through `Location`, so the same code runs on a laptop
folder and on S3. S3 settings come from the usual AWS environment variables, including
`AWS_ENDPOINT_URL` (MinIO, moto). A `Location` pickles, so Ray tasks and actors can
take one as an argument.

Transient storage errors (throttling, 5xx, dropped connections, timeouts) are retried
in layers. botocore retries each single S3 request (`_s3_options`: adaptive mode, which
also slows the client down when S3 throttles it), and s3fs retries SlowDown and some
network errors itself. Above them, `retrying` repeats a whole operation — every `Location` method, `list_shards`, opening a shard — with
exponential backoff and full jitter when an error still comes through and
`is_transient` says so. Permanent errors (not found, access denied, a bad bucket) are
raised at once. Settings: `RAYBATCH_STORAGE_RETRIES` (attempts per operation, the first
included; default 6, 1 turns the layer off), `RAYBATCH_STORAGE_RETRY_DELAY` (base delay,
default 0.2 s) and `RAYBATCH_STORAGE_RETRY_MAX_DELAY` (default 10 s). Reads in the middle
of a stream are not repeated here: s3fs and botocore retry each ranged GET themselves.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import posixpath
import random
import time
import uuid
from dataclasses import dataclass
from typing import IO, Callable, Iterator, TypeVar

import aiohttp
import botocore.exceptions
import fsspec
from fsspec.core import url_to_fs
from fsspec.exceptions import FSTimeoutError

from raybatch import faults
from raybatch.exceptions import ConfigError, StorageUnavailable

logger = logging.getLogger(__name__)
T = TypeVar("T")

# botocore's own per-request retries (the first layer). AWS_MAX_ATTEMPTS and
# AWS_RETRY_MODE still win, as they do for any AWS tool.
S3_REQUEST_ATTEMPTS = 3


def _s3_options() -> dict:
    retries = {
        "max_attempts": int(os.environ.get("AWS_MAX_ATTEMPTS") or S3_REQUEST_ATTEMPTS),
        "mode": os.environ.get("AWS_RETRY_MODE") or "adaptive",
    }
    options: dict = {"config_kwargs": {"retries": retries}}
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        options["client_kwargs"] = {"endpoint_url": endpoint}
    return options


# ------------------------------------------------------------------------- retries

# S3 error codes (and bare HTTP statuses, which botocore uses as the code when a proxy
# answers without an S3 error body) that say "try again later".
TRANSIENT_CODES = frozenset({
    "SlowDown", "Throttling", "ThrottlingException", "ThrottledException", "RequestThrottled",
    "TooManyRequestsException", "RequestLimitExceeded", "RequestTimeout",
    "RequestTimeoutException", "InternalError", "ServiceUnavailable", "OperationAborted",
    "429", "500", "502", "503", "504",
})
TRANSIENT_STATUSES = frozenset({429, 500, 502, 503, 504})
TRANSIENT_TYPES = (
    ConnectionError,  # also ConnectionResetError, BrokenPipeError, ConnectionRefusedError
    TimeoutError,  # also socket.timeout
    asyncio.TimeoutError,  # its own class before Python 3.11
    FSTimeoutError,
    botocore.exceptions.ConnectionError,  # EndpointConnectionError, ConnectTimeoutError
    botocore.exceptions.HTTPClientError,  # ConnectionClosedError, ReadTimeoutError
    aiohttp.ClientConnectionError,  # ServerDisconnectedError, ClientOSError, ...
    aiohttp.ClientPayloadError,  # a body cut short
)
# ECONNRESET, ETIMEDOUT, EPIPE: the network. EBUSY and EREMOTEIO: what s3fs turns
# SlowDown/503 and InternalError/500 into when it drops the original error.
TRANSIENT_ERRNOS = frozenset(
    getattr(errno, name)
    for name in ("ECONNRESET", "ECONNABORTED", "ETIMEDOUT", "EPIPE", "EBUSY", "EREMOTEIO")
    if hasattr(errno, name)
)
PERMANENT_TYPES = (FileNotFoundError, PermissionError, FileExistsError, IsADirectoryError, NotADirectoryError)


def is_transient(error: BaseException) -> bool:
    """Whether repeating the failed storage call may succeed.

    s3fs raises botocore's `ClientError` as a plain Python error (`OSError`,
    `FileNotFoundError`, ...) with the original as `__cause__`, so the whole cause chain
    is looked at. The S3 error code decides when there is one; else the error's type or
    errno. Not found, access denied, a bad bucket or request, and anything unknown are
    permanent.
    """
    chain = []
    while error is not None and all(error is not seen for seen in chain):
        chain.append(error)
        error = error.__cause__
    for link in chain:
        if isinstance(link, (StorageUnavailable, *PERMANENT_TYPES)):
            return False  # StorageUnavailable: already retried to the end
        if isinstance(link, botocore.exceptions.ClientError):
            response = link.response or {}
            code = str(response.get("Error", {}).get("Code", ""))
            status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            return code in TRANSIENT_CODES or status in TRANSIENT_STATUSES
    return any(
        isinstance(link, TRANSIENT_TYPES) or (isinstance(link, OSError) and link.errno in TRANSIENT_ERRNOS)
        for link in chain
    )


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 6
    base_delay: float = 0.2
    max_delay: float = 10.0

    @classmethod
    def from_env(cls) -> "RetryPolicy":
        """The defaults, overridden by RAYBATCH_STORAGE_RETRIES (attempts, the first
        included), RAYBATCH_STORAGE_RETRY_DELAY and RAYBATCH_STORAGE_RETRY_MAX_DELAY
        (seconds). Read on every operation, so a Ray worker follows its own environment."""
        values = {}
        for field, variable, kind in (
            ("attempts", "RAYBATCH_STORAGE_RETRIES", int),
            ("base_delay", "RAYBATCH_STORAGE_RETRY_DELAY", float),
            ("max_delay", "RAYBATCH_STORAGE_RETRY_MAX_DELAY", float),
        ):
            text = os.environ.get(variable)
            if text:
                try:
                    values[field] = kind(text)
                except ValueError:
                    raise ConfigError(f"{variable}={text!r} is not a number") from None
                if values[field] < (1 if kind is int else 0):
                    raise ConfigError(f"{variable}={text!r} is out of range")
        return cls(**values)

    def delay(self, retry: int) -> float:
        """Seconds to wait before retry number `retry` (1, 2, ...): "full jitter", a
        uniform draw below an exponentially growing cap, so that many workers throttled
        together do not come back together."""
        return random.uniform(0, min(self.max_delay, self.base_delay * 2 ** (retry - 1)))


_sleep = time.sleep  # tests replace it


def retrying(operation: str, where: str, call: Callable[[], T], policy: RetryPolicy | None = None) -> T:
    """`call()`, repeated after transient errors (see `is_transient`) up to the policy's
    attempts. Only for calls that are safe to repeat whole: each caller says why.

    A permanent error is raised at once. When the attempts run out, `StorageUnavailable`
    is raised from the last error. `where` is a path, never a credential. The
    reliability tests inject transient errors here (`raybatch.faults`), before a call
    or after it took effect, which is why every caller must be safe to repeat.
    """
    policy = policy or RetryPolicy.from_env()
    for attempt in range(1, policy.attempts + 1):
        try:
            faults.maybe_storage_error(operation, where, "before")
            result = call()
            faults.maybe_storage_error(operation, where, "after")
            return result
        except Exception as error:
            if not is_transient(error):
                raise
            if attempt == policy.attempts:
                raise StorageUnavailable(
                    f"storage {operation} {where} still failing after {attempt} attempts with "
                    f"transient errors; last: {type(error).__name__}: {error}"
                ) from error
            delay = policy.delay(attempt)
            logger.warning(
                "storage %s %s failed (attempt %d of %d), retrying in %.2f s: %s: %s",
                operation, where, attempt, policy.attempts, delay, type(error).__name__, error,
            )
            _sleep(delay)
    raise AssertionError("unreachable")


def filesystem_for(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem and the path inside it for a local path or URL."""
    if "://" not in url:
        url = os.path.abspath(os.path.expanduser(url))
    options = _s3_options() if url.startswith(("s3://", "s3a://")) else {}
    if url.startswith(("http://", "https://")):
        # A dataset's externalUrl (api/external_urls.py): its host was checked, a
        # redirect's target would not be (a public URL answering 302 to a metadata IP).
        options = {"allow_redirects": False}
    fs, path = url_to_fs(url, **options)
    return fs, path.rstrip("/") or "/"


def _is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))


# Local files and folders are the owner's only: the store holds every tenant's data, the
# API key records and the URL signing key, and any user of the host could read them at
# the usual 0644/0755.
FILE_MODE, FOLDER_MODE = 0o600, 0o700
# The marker of a file being written beside its final name (renamed when complete).
TEMPORARY_MARKER = ".tmp-"


def is_temporary(name: str) -> bool:
    """Whether a name is one of the service's own unfinished writes. Every listing skips
    them (`Location.list`, `list_shards`), and uploads may not use such names, so what a
    job reads is what the size checks measured."""
    return TEMPORARY_MARKER in name


def make_private_folders(path: str) -> None:
    """`os.makedirs` with every folder it creates at FOLDER_MODE (os.makedirs gives the
    mode to the last folder only)."""
    missing = []
    while path and not os.path.isdir(path):
        missing.append(path)
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    for folder in reversed(missing):
        try:
            os.mkdir(folder, FOLDER_MODE)
        except FileExistsError:
            pass  # made meanwhile by another writer


def open_private(path: str) -> IO[bytes]:
    """A new local file for writing, created at FILE_MODE (never wider, whatever the umask)."""
    return os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE), "wb")


@dataclass(frozen=True)
class Shard:
    """One input file. `name` is its path relative to the input location, as error rows
    and commit records name it."""

    url: str
    name: str
    size: int


class Location:
    """A folder (local) or prefix (S3) that raybatch reads or writes under.

    Every method is one `retrying` operation (see the module docstring); each says why
    repeating it whole is safe.
    """

    def __init__(self, url: str):
        self.url = url
        self.fs, self.root = filesystem_for(url)

    def __reduce__(self):
        return (Location, (self.url,))

    def path(self, *parts: str) -> str:
        return posixpath.join(self.root, *parts)

    def where(self, relative: str = "") -> str:
        """The full URL of `relative`, for messages (no credentials: fsspec paths hold none)."""
        return self.fs.unstrip_protocol(self.path(relative) if relative else self.root)

    def exists(self, relative: str) -> bool:
        # A read: nothing changes, so it repeats freely. So do read_bytes and list.
        return retrying("exists", self.where(relative), lambda: self.fs.exists(self.path(relative)))

    def read_bytes(self, relative: str) -> bytes:
        return retrying("read", self.where(relative), lambda: self.fs.cat_file(self.path(relative)))

    def size(self, relative: str) -> int:
        return retrying("size", self.where(relative), lambda: self.fs.size(self.path(relative)))

    def open_read(self, relative: str) -> IO[bytes]:
        """A stream for reading. The open is retried (on S3 a HEAD); reads from the
        stream are not: s3fs and botocore retry each ranged GET themselves."""
        return retrying("open", self.where(relative), lambda: self.fs.open(self.path(relative), "rb"))

    def write_atomic(self, relative: str, data: bytes) -> None:
        """Readers see the old object or the whole new one, never a torn one.

        An S3 PUT is atomic by itself; a local file is written beside and renamed.
        Retried whole: writing the same bytes to the same name again gives the same
        object, even when the failed attempt had in fact landed (a lost reply), so a
        retry never duplicates anything (names are fixed by the caller: part and commit
        names carry their sequence number). A retry is no more than this write arriving
        late, which last-writer-wins storage allows anyway. A failed local attempt leaves
        no temporary file.
        """
        retrying("write", self.where(relative), lambda: self._write_atomic_once(relative, data))

    def _write_atomic_once(self, relative: str, data: bytes) -> None:
        target = self.path(relative)
        if not _is_local(self.fs):
            self.fs.pipe_file(target, data)
            return
        make_private_folders(posixpath.dirname(target))
        temporary = f"{target}{TEMPORARY_MARKER}{uuid.uuid4().hex}"
        try:
            with open_private(temporary) as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temporary, target)
        except BaseException:
            if os.path.exists(temporary):
                os.remove(temporary)
            raise

    def open_atomic_writer(self, relative: str) -> "AtomicWriter":
        return AtomicWriter(self, relative)

    def list(self, relative: str = "") -> list[str]:
        """Names (relative to `relative`) of the files directly under it, sorted."""
        folder = self.path(relative)

        def list_once() -> list[str]:
            if not self.fs.exists(folder):
                return []
            return [posixpath.basename(p.rstrip("/")) for p in self.fs.ls(folder, detail=False)]

        names = retrying("list", self.where(relative), list_once)
        return sorted(n for n in names if not is_temporary(n))

    def move(self, source: str, target: str) -> None:
        """Rename `source` to `target` (S3: copy, then delete). Repeats safely: once the
        source is gone and the target there, an earlier attempt already did it."""
        source_path, target_path = self.path(source), self.path(target)

        def move_once() -> None:
            if not self.fs.exists(source_path) and self.fs.exists(target_path):
                return
            if _is_local(self.fs):
                make_private_folders(posixpath.dirname(target_path))
                os.replace(source_path, target_path)
            else:
                self.fs.copy(source_path, target_path)
                self.fs.rm(source_path)

        retrying("move", self.where(source), move_once)

    def delete(self, relative: str) -> None:
        target = self.path(relative)

        def delete_once() -> None:
            # Repeats safely because it looks first: whatever an earlier attempt already
            # removed is simply not there any more (and S3's DeleteObjects ignores
            # missing keys), so a retry finishes the job instead of failing on it.
            if self.fs.exists(target):
                self.fs.rm(target, recursive=True)

        retrying("delete", self.where(relative), delete_once)

    def delete_many(self, relatives: list[str]) -> Iterator[int]:
        """Remove these files (missing ones are no error), in steps: S3 removes up to
        1,000 keys per DeleteObjects request, a local folder one file per step. Yields
        how many are removed after each step. Each step repeats safely: a removed file
        stays removed, and S3's DeleteObjects ignores missing keys."""
        local = _is_local(self.fs)
        step = 1 if local else 1000
        for start in range(0, len(relatives), step):
            paths = [self.path(relative) for relative in relatives[start:start + step]]

            def delete_once(paths: list[str] = paths) -> None:
                if local:
                    for path in paths:
                        try:
                            os.remove(path)
                        except FileNotFoundError:
                            pass
                else:
                    self.fs.rm(paths)

            retrying("delete", self.where(relatives[start]), delete_once)
            yield start + len(paths)


class AtomicWriter:
    """A large object written as a stream and published whole when closed without error.

    Local: a temporary file renamed into place. S3: a multipart upload, which S3 makes
    visible only when it completes; on error it is aborted.

    Retries: opening is retried (nothing is visible yet: s3fs starts no upload before
    the first full block, and a local temporary file is hidden from `list`). Writing
    and closing are not retried here. botocore retries each UploadPart, PutObject and
    CompleteMultipartUpload request itself (re-sending a part number replaces that part;
    completing an upload again can only succeed or find it gone, never make a second
    object). But once an error reaches this class the buffered file's state is unknown:
    s3fs has already taken the block out of its buffer, and fsspec marks a file closed
    even when its close failed, so a second close would report success having published
    nothing. So any failure aborts the upload (nothing partial is ever visible) and is
    raised, and the caller re-runs the whole write: `publish_files` does so itself; an
    API upload fails its request, which the client repeats.
    """

    def __init__(self, location: Location, relative: str):
        self._location = location
        self._target = location.path(relative)
        self._local = _is_local(location.fs)
        if self._local:
            self._written = f"{self._target}{TEMPORARY_MARKER}{uuid.uuid4().hex}"
        else:
            self._written = self._target

        def open_once() -> IO[bytes]:
            if self._local:
                make_private_folders(posixpath.dirname(self._target))
                # The name is this writer's own (random): a file there is an earlier
                # attempt's whose reply was lost, and creating it again would fail.
                if os.path.exists(self._written):
                    os.remove(self._written)
                return open_private(self._written)
            return location.fs.open(self._written, "wb")

        self._handle: IO[bytes] = retrying("open for writing", location.where(relative), open_once)

    def write(self, data: bytes) -> None:
        self._handle.write(data)

    def __enter__(self) -> "AtomicWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self._abandon()
            return
        try:
            self._handle.close()  # S3: one PUT, or CompleteMultipartUpload
            if self._local:
                os.replace(self._written, self._target)
        except BaseException:
            self._abandon()
            raise

    def _abandon(self) -> None:
        """Throw the unpublished data away. Never raises: the caller's error matters more,
        and an upload that could not be aborted is still invisible (an S3 lifecycle rule
        for incomplete multipart uploads reclaims its parts)."""
        try:
            if self._local:
                self._handle.close()
                if os.path.exists(self._written):
                    os.remove(self._written)
            else:
                try:
                    # s3fs: AbortMultipartUpload, if an upload was started. Repeatable:
                    # s3fs forgets the upload only once the abort succeeded.
                    retrying("abort upload", self._location.fs.unstrip_protocol(self._written), self._handle.discard)
                finally:
                    # A discarded fsspec file left open would try to upload again when
                    # garbage collected (its __del__ closes it): mark it closed.
                    self._handle.closed = True
        except Exception as error:
            logger.warning(
                "could not discard the unfinished upload of %s: %s: %s",
                self._location.fs.unstrip_protocol(self._target), type(error).__name__, error,
            )


def list_shards(input_url: str) -> list[Shard]:
    """The input's `.jsonl` shards in a stable order: one file, or every `.jsonl` file
    under a folder/prefix (recursively), sorted by relative name. Hidden names (`.`,
    `_`) and the service's unfinished writes (`is_temporary`) are not shards. A
    dataset's size checks use this same listing, so a job reads only what they measured."""
    fs, root = filesystem_for(input_url)
    # Metadata reads only, so the whole listing repeats safely. A missing input is a
    # ConfigError, permanent, so it is raised at once.
    return retrying("list shards", fs.unstrip_protocol(root), lambda: _list_shards_once(fs, root, input_url))


def _list_shards_once(fs: fsspec.AbstractFileSystem, root: str, input_url: str) -> list[Shard]:
    if not fs.exists(root):
        raise ConfigError(f"input not found: {input_url}")
    if fs.isfile(root):
        return [Shard(fs.unstrip_protocol(root), posixpath.basename(root), fs.size(root))]
    shards = []
    for path, info in sorted(fs.find(root, detail=True).items()):
        name = posixpath.relpath(path, root)
        hidden = any(part.startswith((".", "_")) for part in name.split("/")) or is_temporary(name)
        if name.endswith(".jsonl") and not hidden and info.get("type") == "file":
            shards.append(Shard(fs.unstrip_protocol(path), name, int(info.get("size") or 0)))
    if not shards:
        raise ConfigError(f"no .jsonl files under {input_url}")
    return shards


def open_shard(shard: Shard) -> IO[bytes]:
    """Open a shard for streaming reads (S3 reads go in ranged blocks).

    The open (on S3 a HEAD for the size) is retried: it reads only. Reads from the
    stream are not: s3fs retries each ranged GET itself, and the reader's position
    lives in the file object.
    """
    fs, path = filesystem_for(shard.url)
    return retrying("open", shard.url, lambda: fs.open(path, "rb"))
