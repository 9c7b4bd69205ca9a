"""Object storage access: local folders, `file://` and `s3://` through one interface.

Everything raybatch keeps goes through `Location`, so the same code runs on a laptop
folder and on S3. S3 settings come from the usual AWS environment variables, including
`AWS_ENDPOINT_URL` (MinIO, moto). A `Location` pickles, so Ray tasks and actors can
take one as an argument.
"""

from __future__ import annotations

import os
import posixpath
import uuid
from dataclasses import dataclass
from typing import IO

import fsspec
from fsspec.core import url_to_fs

from raybatch.exceptions import ConfigError


def _s3_options() -> dict:
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    return {"client_kwargs": {"endpoint_url": endpoint}} if endpoint else {}


def filesystem_for(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem and the path inside it for a local path or URL."""
    if "://" not in url:
        url = os.path.abspath(os.path.expanduser(url))
    options = _s3_options() if url.startswith(("s3://", "s3a://")) else {}
    fs, path = url_to_fs(url, **options)
    return fs, path.rstrip("/") or "/"


def _is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))


@dataclass(frozen=True)
class Shard:
    """One input file. `name` is its path relative to the input location, as error rows
    and commit records name it."""

    url: str
    name: str
    size: int


class Location:
    """A folder (local) or prefix (S3) that raybatch reads or writes under."""

    def __init__(self, url: str):
        self.url = url
        self.fs, self.root = filesystem_for(url)

    def __reduce__(self):
        return (Location, (self.url,))

    def path(self, *parts: str) -> str:
        return posixpath.join(self.root, *parts)

    def exists(self, relative: str) -> bool:
        return self.fs.exists(self.path(relative))

    def read_bytes(self, relative: str) -> bytes:
        return self.fs.cat_file(self.path(relative))

    def write_atomic(self, relative: str, data: bytes) -> None:
        """Readers see the old object or the whole new one, never a torn one.

        An S3 PUT is atomic by itself; a local file is written beside and renamed.
        """
        target = self.path(relative)
        if not _is_local(self.fs):
            self.fs.pipe_file(target, data)
            return
        self.fs.makedirs(posixpath.dirname(target), exist_ok=True)
        temporary = f"{target}.tmp-{uuid.uuid4().hex}"
        with open(temporary, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, target)

    def open_atomic_writer(self, relative: str) -> "AtomicWriter":
        return AtomicWriter(self, relative)

    def list(self, relative: str = "") -> list[str]:
        """Names (relative to `relative`) of the files directly under it, sorted."""
        folder = self.path(relative)
        if not self.fs.exists(folder):
            return []
        names = [posixpath.basename(p.rstrip("/")) for p in self.fs.ls(folder, detail=False)]
        return sorted(n for n in names if ".tmp-" not in n)

    def delete(self, relative: str) -> None:
        target = self.path(relative)
        if self.fs.exists(target):
            self.fs.rm(target, recursive=True)


class AtomicWriter:
    """A large object written as a stream and published whole when closed without error.

    Local: a temporary file renamed into place. S3: a multipart upload, which S3 makes
    visible only when it completes; on error it is aborted.
    """

    def __init__(self, location: Location, relative: str):
        self._location = location
        self._target = location.path(relative)
        self._local = _is_local(location.fs)
        if self._local:
            location.fs.makedirs(posixpath.dirname(self._target), exist_ok=True)
            self._written = f"{self._target}.tmp-{uuid.uuid4().hex}"
        else:
            self._written = self._target
        self._handle: IO[bytes] = location.fs.open(self._written, "wb")

    def write(self, data: bytes) -> None:
        self._handle.write(data)

    def __enter__(self) -> "AtomicWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            if hasattr(self._handle, "discard"):
                self._handle.discard()  # s3fs: abort the multipart upload
            else:
                self._handle.close()
            if self._local and os.path.exists(self._written):
                os.remove(self._written)
            return
        self._handle.close()
        if self._local:
            os.replace(self._written, self._target)


def list_shards(input_url: str) -> list[Shard]:
    """The input's `.jsonl` shards in a stable order: one file, or every `.jsonl` file
    under a folder/prefix (recursively), sorted by relative name."""
    fs, root = filesystem_for(input_url)
    if not fs.exists(root):
        raise ConfigError(f"input not found: {input_url}")
    if fs.isfile(root):
        return [Shard(fs.unstrip_protocol(root), posixpath.basename(root), fs.size(root))]
    shards = []
    for path, info in sorted(fs.find(root, detail=True).items()):
        name = posixpath.relpath(path, root)
        hidden = any(part.startswith((".", "_")) for part in name.split("/"))
        if name.endswith(".jsonl") and not hidden and info.get("type") == "file":
            shards.append(Shard(fs.unstrip_protocol(path), name, int(info.get("size") or 0)))
    if not shards:
        raise ConfigError(f"no .jsonl files under {input_url}")
    return shards


def open_shard(shard: Shard) -> IO[bytes]:
    """Open a shard for streaming reads (S3 reads go in ranged blocks)."""
    fs, path = filesystem_for(shard.url)
    return fs.open(path, "rb")
