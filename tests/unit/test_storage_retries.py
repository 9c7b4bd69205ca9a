"""Storage retries, without Ray: transient errors are retried with backoff and never
duplicate or expose anything; permanent errors surface after one attempt.

Faults come from `FlakyFileSystem`, an S3-like store in memory (a PUT replaces an object
whole; a streamed write is a staged upload that appears only when completed). The last
tests run against moto's real S3 server behind a proxy that answers 503.
"""

from __future__ import annotations

import os

import errno
import http.client
import http.server
import json
import logging
import threading
from collections import Counter

import aiohttp
import botocore.exceptions
import fsspec
import pytest
from fsspec.implementations.memory import MemoryFile, MemoryFileSystem
from fsspec.spec import AbstractBufferedFile

from raybatch import storage
from raybatch.exceptions import ConfigError, StorageUnavailable
from raybatch.output_layout import ERRORS_FILE, RESULTS_FILE, load_commits, publish_files
from raybatch.pipeline.write import OutputWriter
from raybatch.storage import Location, RetryPolicy, is_transient, list_shards, open_shard
from tests.helpers import batch


def client_error(code: str, status: int, operation: str = "PutObject") -> botocore.exceptions.ClientError:
    return botocore.exceptions.ClientError(
        {"Error": {"Code": code, "Message": f"{code} happened"}, "ResponseMetadata": {"HTTPStatusCode": status}},
        operation,
    )


def as_s3fs_raises(error: botocore.exceptions.ClientError) -> OSError:
    """The Python error s3fs raises for a ClientError, the original as its cause."""
    from s3fs.errors import translate_boto_error

    return translate_boto_error(error)


# Each transient kind as storage code meets it: raw from botocore/aiohttp, or translated
# by s3fs. A factory each, since a raised exception object should not be raised twice.
TRANSIENT = {
    "SlowDown (s3fs)": lambda: as_s3fs_raises(client_error("SlowDown", 503)),
    "SlowDown": lambda: client_error("SlowDown", 503),
    "Throttling": lambda: client_error("Throttling", 400),
    "ThrottlingException": lambda: client_error("ThrottlingException", 400),
    "RequestTimeout (s3fs)": lambda: as_s3fs_raises(client_error("RequestTimeout", 400)),
    "InternalError (s3fs)": lambda: as_s3fs_raises(client_error("InternalError", 500)),
    "ServiceUnavailable": lambda: client_error("ServiceUnavailable", 503),
    "500": lambda: as_s3fs_raises(client_error("500", 500)),
    "502": lambda: as_s3fs_raises(client_error("502", 502)),
    "503": lambda: client_error("503", 503),
    "504": lambda: as_s3fs_raises(client_error("GatewayTimeout", 504)),
    "ConnectionError": lambda: ConnectionError("connection dropped"),
    "ConnectionResetError": lambda: ConnectionResetError(errno.ECONNRESET, "reset by peer"),
    "BrokenPipeError": lambda: BrokenPipeError(errno.EPIPE, "broken pipe"),
    "TimeoutError": lambda: TimeoutError("timed out"),
    "OSError ECONNRESET": lambda: OSError(errno.ECONNRESET, "reset"),
    "OSError ETIMEDOUT": lambda: OSError(errno.ETIMEDOUT, "timed out"),
    "OSError EPIPE": lambda: OSError(errno.EPIPE, "pipe"),
    "s3fs EBUSY without cause": lambda: OSError(errno.EBUSY, "Please reduce your request rate."),
    "EndpointConnectionError": lambda: botocore.exceptions.EndpointConnectionError(endpoint_url="http://s3"),
    "ConnectionClosedError": lambda: botocore.exceptions.ConnectionClosedError(endpoint_url="http://s3"),
    "ReadTimeoutError": lambda: botocore.exceptions.ReadTimeoutError(endpoint_url="http://s3"),
    "aiohttp ServerDisconnectedError": lambda: aiohttp.ServerDisconnectedError(),
    "aiohttp ClientPayloadError": lambda: aiohttp.ClientPayloadError("cut short"),
}

PERMANENT = {
    "FileNotFoundError": lambda: FileNotFoundError(errno.ENOENT, "no such key"),
    "PermissionError": lambda: PermissionError(errno.EACCES, "denied"),
    "AccessDenied": lambda: client_error("AccessDenied", 403),
    "AccessDenied (s3fs)": lambda: as_s3fs_raises(client_error("AccessDenied", 403)),
    "NoSuchBucket": lambda: client_error("NoSuchBucket", 404),
    "NoSuchBucket (s3fs)": lambda: as_s3fs_raises(client_error("NoSuchBucket", 404)),
    "InvalidBucketName (s3fs)": lambda: as_s3fs_raises(client_error("InvalidBucketName", 400)),
    "ValueError (bad bucket name)": lambda: ValueError("Bucket name must match the regex"),
    "already gave up": lambda: StorageUnavailable("storage write x still failing"),
}


# ----------------------------------------------------------------- the fake store


class StagedUpload(AbstractBufferedFile):
    """An S3 multipart upload in miniature: blocks are staged as parts, the object
    appears only when the upload completes, and `discard` aborts it."""

    def _initiate_upload(self):
        self.fs.fault("create_multipart_upload")
        self.parts = []

    def _upload_chunk(self, final=False):
        self.fs.fault("upload_part")
        self.parts.append(self.buffer.getvalue())
        if final:
            self.fs.fault("complete_multipart_upload")
            self.fs.store[self.path] = MemoryFile(self.fs, self.path, b"".join(self.parts))
        return True

    def discard(self):
        self.fs.fault("abort_multipart_upload")
        FlakyFileSystem.aborted.append(self.path)
        self.parts = []


class FlakyFileSystem(MemoryFileSystem):
    """`flaky://`: calls fail on demand. `fail(method, *errors)` makes the next calls of
    `method` raise those errors in turn before doing anything; `fail_after` makes them
    raise after the call took effect (a reply lost on the way back)."""

    protocol = ("flaky",)
    store: dict = {}
    pseudo_dirs = [""]
    calls: Counter = Counter()
    before: dict = {}
    after: dict = {}
    aborted: list = []

    @classmethod
    def reset(cls):
        cls.store.clear()
        cls.pseudo_dirs[:] = [""]
        cls.calls.clear()
        cls.before.clear()
        cls.after.clear()
        cls.aborted.clear()

    @classmethod
    def _strip_protocol(cls, path):
        return super()._strip_protocol(str(path).removeprefix("flaky://"))

    def fail(self, method, *errors):
        self.before.setdefault(method, []).extend(errors)

    def fail_after(self, method, *errors):
        self.after.setdefault(method, []).extend(errors)

    def fault(self, method, stage="before"):
        if stage == "before":
            self.calls[method] += 1
        planned = (self.before if stage == "before" else self.after).get(method)
        if planned:
            raise planned.pop(0)

    def pipe_file(self, path, value, **kwargs):
        self.store[self._strip_protocol(path)] = MemoryFile(self, self._strip_protocol(path), value)

    def _open(self, path, mode="rb", **kwargs):
        if mode == "wb":
            return StagedUpload(self, path, mode, block_size=4)
        return super()._open(path, mode, **kwargs)


def _faulty(name):
    method = getattr(FlakyFileSystem, name)

    def call(self, *args, **kwargs):
        self.fault(name)
        result = method(self, *args, **kwargs)
        self.fault(name, "after")
        return result

    return call


for _name in ("exists", "cat_file", "pipe_file", "ls", "rm", "find", "isfile", "size", "_open"):
    setattr(FlakyFileSystem, _name, _faulty(_name))

fsspec.register_implementation("flaky", FlakyFileSystem, clobber=True)


@pytest.fixture(autouse=True)
def fast_retries(monkeypatch):
    """No real sleeping; the delays asked for are kept in `slept`."""
    slept = []
    monkeypatch.setattr(storage, "_sleep", slept.append)
    for variable in ("RAYBATCH_STORAGE_RETRIES", "RAYBATCH_STORAGE_RETRY_DELAY", "RAYBATCH_STORAGE_RETRY_MAX_DELAY"):
        monkeypatch.delenv(variable, raising=False)
    FlakyFileSystem.reset()
    yield slept
    FlakyFileSystem.reset()


@pytest.fixture
def flaky():
    location = Location("flaky://bucket/out")
    return location, location.fs


# ------------------------------------------------------------------ classification


@pytest.mark.parametrize("kind", TRANSIENT)
def test_transient_errors_are_classified_transient(kind):
    assert is_transient(TRANSIENT[kind]())


@pytest.mark.parametrize("kind", PERMANENT)
def test_permanent_errors_are_classified_permanent(kind):
    assert not is_transient(PERMANENT[kind]())


def test_unknown_errors_are_permanent():
    assert not is_transient(RuntimeError("bug"))
    assert not is_transient(OSError(errno.EIO, "unknown S3 code"))
    assert not is_transient(as_s3fs_raises(client_error("InvalidArgument", 400)))


# ------------------------------------------------------------------ retried writes


@pytest.mark.parametrize("kind", TRANSIENT)
def test_write_is_retried_through_each_transient_error(flaky, kind, caplog):
    location, fs = flaky
    fs.fail("pipe_file", TRANSIENT[kind](), TRANSIENT[kind]())
    with caplog.at_level(logging.WARNING, logger="raybatch.storage"):
        location.write_atomic("a/b.json", b"{}")
    assert fs.calls["pipe_file"] == 3
    assert location.read_bytes("a/b.json") == b"{}"
    assert location.list("a") == ["b.json"]
    retries = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(retries) == 2
    assert all("write" in r.getMessage() and "flaky:///bucket/out/a/b.json" in r.getMessage() for r in retries)


def test_a_write_that_landed_but_lost_its_reply_is_not_duplicated(flaky):
    location, fs = flaky
    fs.fail_after("pipe_file", ConnectionResetError("reply lost"), TimeoutError("reply lost"))
    location.write_atomic("parts/1.jsonl", b"line\n")
    assert fs.calls["pipe_file"] == 3
    assert location.list("parts") == ["1.jsonl"]
    assert location.read_bytes("parts/1.jsonl") == b"line\n"


@pytest.mark.parametrize("operation, method", [
    (lambda loc: loc.exists("x"), "exists"),
    (lambda loc: loc.read_bytes("x"), "cat_file"),
    (lambda loc: loc.list(), "ls"),
    (lambda loc: loc.delete("x"), "rm"),
    (lambda loc: loc.open_atomic_writer("y").__exit__(None, None, None), "_open"),
])
def test_every_location_operation_is_retried(flaky, operation, method):
    location, fs = flaky
    location.write_atomic("x", b"data")
    fs.fail(method, client_error("SlowDown", 503), ConnectionResetError("reset"))
    operation(location)
    assert fs.calls[method] == 3


def test_delete_retried_after_a_partial_delete_finishes_it(flaky):
    location, fs = flaky
    for name in ("d/1", "d/2", "d/3"):
        location.write_atomic(name, b"x")
    fs.fail_after("rm", ConnectionResetError("reply lost"))
    location.delete("d")
    assert location.list("d") == [] and not location.exists("d/1")


def test_shard_listing_and_opening_are_retried(flaky):
    location, fs = flaky
    location.write_atomic("in/a.jsonl", b'{"x": 1}\n')
    location.write_atomic("in/b.jsonl", b'{"x": 2}\n')
    fs.fail("find", TimeoutError("slow"))
    fs.fail("exists", client_error("503", 503))
    shards = list_shards("flaky://bucket/out/in")
    assert [s.name for s in shards] == ["a.jsonl", "b.jsonl"]
    assert fs.calls["find"] == 2
    fs.fail("_open", botocore.exceptions.EndpointConnectionError(endpoint_url="http://s3"))
    with open_shard(shards[0]) as handle:
        assert handle.read() == b'{"x": 1}\n'
    assert fs.calls["_open"] == 2


# ----------------------------------------------------------------- permanent errors


@pytest.mark.parametrize("kind", PERMANENT)
def test_permanent_errors_surface_after_one_attempt(flaky, kind, fast_retries):
    location, fs = flaky
    error = PERMANENT[kind]()
    fs.fail("cat_file", error)
    with pytest.raises(type(error)) as raised:
        location.read_bytes("anything")
    assert raised.value is error
    assert fs.calls["cat_file"] == 1 and fast_retries == []


def test_a_missing_input_is_a_config_error_at_once(flaky):
    with pytest.raises(ConfigError, match="input not found"):
        list_shards("flaky://bucket/nothing-here")
    assert FlakyFileSystem.calls["exists"] == 1


# ------------------------------------------------------------------ giving up


def test_exhausted_attempts_raise_the_last_error_with_a_clear_message(flaky, monkeypatch, caplog):
    location, fs = flaky
    monkeypatch.setenv("RAYBATCH_STORAGE_RETRIES", "3")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cr3t-never-logged")
    errors = [client_error("SlowDown", 503), ConnectionResetError("reset"), TimeoutError("the last one")]
    fs.fail("pipe_file", *errors)
    with caplog.at_level(logging.WARNING, logger="raybatch.storage"):
        with pytest.raises(StorageUnavailable) as raised:
            location.write_atomic("job.json", b"{}")
    assert fs.calls["pipe_file"] == 3
    message = str(raised.value)
    assert "write flaky:///bucket/out/job.json" in message
    assert "after 3 attempts" in message and "TimeoutError: the last one" in message
    assert raised.value.__cause__ is errors[-1]
    assert isinstance(raised.value, OSError) and not is_transient(raised.value)
    assert not location.exists("job.json")
    assert len(caplog.records) == 2
    assert "s3cr3t" not in caplog.text


def test_backoff_grows_exponentially_with_jitter_and_is_capped(flaky, monkeypatch, fast_retries):
    location, fs = flaky
    monkeypatch.setattr(storage.random, "uniform", lambda low, high: high)  # the top of each draw
    monkeypatch.setenv("RAYBATCH_STORAGE_RETRY_MAX_DELAY", "1")
    fs.fail("cat_file", *(TimeoutError() for _ in range(6)))
    with pytest.raises(StorageUnavailable):
        location.read_bytes("x")
    assert fs.calls["cat_file"] == 6
    assert fast_retries == [0.2, 0.4, 0.8, 1, 1]
    policy = RetryPolicy()
    assert all(0 <= policy.delay(n) <= min(10, 0.2 * 2 ** (n - 1)) for n in range(1, 30) for _ in range(20))


def test_retry_settings_come_from_the_environment(monkeypatch):
    assert RetryPolicy.from_env() == RetryPolicy(attempts=6, base_delay=0.2, max_delay=10.0)
    monkeypatch.setenv("RAYBATCH_STORAGE_RETRIES", "1")
    monkeypatch.setenv("RAYBATCH_STORAGE_RETRY_DELAY", "0")
    monkeypatch.setenv("RAYBATCH_STORAGE_RETRY_MAX_DELAY", "2.5")
    assert RetryPolicy.from_env() == RetryPolicy(attempts=1, base_delay=0.0, max_delay=2.5)
    for value in ("zero", "0"):
        monkeypatch.setenv("RAYBATCH_STORAGE_RETRIES", value)
        with pytest.raises(ConfigError, match="RAYBATCH_STORAGE_RETRIES"):
            RetryPolicy.from_env()


def test_one_attempt_turns_retries_off(flaky, monkeypatch):
    location, fs = flaky
    monkeypatch.setenv("RAYBATCH_STORAGE_RETRIES", "1")
    fs.fail("cat_file", TimeoutError("once"))
    with pytest.raises(StorageUnavailable, match="after 1 attempts"):
        location.read_bytes("x")
    assert fs.calls["cat_file"] == 1


# ------------------------------------------------------------------ streamed writes


def test_a_writer_failing_mid_stream_leaves_nothing_visible(flaky):
    location, fs = flaky
    with pytest.raises(KeyError, match="producer failed"):
        with location.open_atomic_writer("big.jsonl") as writer:
            for _ in range(3):
                writer.write(b"0123")  # a part staged each time
            raise KeyError("producer failed")
    assert fs.calls["upload_part"] == 3
    assert FlakyFileSystem.aborted == ["/bucket/out/big.jsonl"]
    assert location.list() == [] and not location.exists("big.jsonl")


def test_a_failed_upload_part_aborts_and_is_not_retried_in_the_writer(flaky):
    location, fs = flaky
    fs.fail("upload_part", TimeoutError("part lost"))
    with pytest.raises(TimeoutError):
        with location.open_atomic_writer("big.jsonl") as writer:
            writer.write(b"0123456789")
    assert fs.calls["upload_part"] == 1
    assert FlakyFileSystem.aborted == ["/bucket/out/big.jsonl"]
    assert location.list() == []


def test_a_failed_close_aborts_and_leaves_nothing_visible(flaky):
    location, fs = flaky
    fs.fail("complete_multipart_upload", client_error("InternalError", 500))
    with pytest.raises(botocore.exceptions.ClientError):
        with location.open_atomic_writer("big.jsonl") as writer:
            writer.write(b"0123456789")
    assert fs.calls["complete_multipart_upload"] == 1  # a second close would publish nothing
    assert FlakyFileSystem.aborted == ["/bucket/out/big.jsonl"]
    assert location.list() == []


def test_a_failed_abort_is_retried_and_the_callers_error_wins(flaky):
    location, fs = flaky
    fs.fail("abort_multipart_upload", ConnectionResetError("reset"))
    with pytest.raises(KeyError):
        with location.open_atomic_writer("big.jsonl") as writer:
            writer.write(b"0123456789")
            raise KeyError("producer failed")
    assert fs.calls["abort_multipart_upload"] == 2
    assert location.list() == []


def test_a_local_writer_failing_mid_stream_leaves_no_file(tmp_path):
    location = Location(str(tmp_path))
    with pytest.raises(KeyError, match="producer failed"):
        with location.open_atomic_writer("out/results.jsonl") as writer:
            writer.write(b"half a file")
            raise KeyError("producer failed")
    assert list((tmp_path / "out").iterdir()) == []


def test_a_local_writer_whose_open_lost_its_reply_opens_again(tmp_path, monkeypatch):
    """The open took effect (the temporary file exists) but its reply was lost: the
    retry must not fail on the file it made itself (a soak once failed a publish so)."""
    from raybatch import faults

    monkeypatch.setenv(faults.FOLDER_VARIABLE, str(tmp_path / "faults"))
    monkeypatch.setenv("RAYBATCH_STORAGE_RETRY_DELAY", "0")
    losses = iter([True, False])
    real = faults.maybe_storage_error

    def lose_the_first_open(operation, where, phase):
        if operation == "open for writing" and phase == "after" and next(losses, False):
            raise ConnectionResetError("reply lost")
        real(operation, where, phase)

    monkeypatch.setattr(faults, "maybe_storage_error", lose_the_first_open)
    location = Location(str(tmp_path / "store"))
    with location.open_atomic_writer("out/results.jsonl") as writer:
        writer.write(b"whole\n")
    assert os.listdir(tmp_path / "store" / "out") == ["results.jsonl"]
    assert (tmp_path / "store" / "out" / "results.jsonl").read_bytes() == b"whole\n"


def test_parts_commits_and_publishing_survive_faults_exactly_once(flaky):
    location, fs = flaky
    writer = OutputWriter("flaky://bucket/out", cap_bytes=10**9, part_max_rows=2, part_max_bytes=10**9,
                          part_max_seconds=3600, total_input_requests=6)
    # Every kind of PUT loses replies and gets throttled along the way.
    fs.fail_after("pipe_file", ConnectionResetError("reply lost"), TimeoutError("reply lost"))
    fs.fail("pipe_file", client_error("SlowDown", 503), client_error("503", 503))
    writer.append(batch(range(1, 7), error_every=3))
    writer.flush()
    assert [c.seq for c in load_commits(location)] == [1, 2, 3]
    assert len(location.list("_raybatch/commits")) == 3
    # Publishing: the first completion fails, so the whole file is written again.
    fs.fail("complete_multipart_upload", client_error("ServiceUnavailable", 503))
    publish_files(location)
    results = [json.loads(x)["line"] for x in location.read_bytes(RESULTS_FILE).splitlines()]
    errors = [json.loads(x)["line"] for x in location.read_bytes(ERRORS_FILE).splitlines()]
    assert sorted(results) == [1, 2, 4, 5] and errors == [3, 6]
    assert FlakyFileSystem.aborted == [f"/bucket/out/{RESULTS_FILE}"]
    assert [n for n in location.list() if n.endswith(".jsonl")] == [ERRORS_FILE, RESULTS_FILE]


# ------------------------------------------------------------- moto's S3 server


class _ThrottlingProxy(http.server.BaseHTTPRequestHandler):
    """Forwards to moto; answers the first `server.fail_puts` PUTs with 503."""

    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def _forward(self):
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if self.command == "PUT":
            self.server.puts += 1
            if self.server.puts <= self.server.fail_puts:
                reply = (b"<?xml version='1.0' encoding='UTF-8'?><Error><Code>ServiceUnavailable</Code>"
                         b"<Message>Service is unavailable.</Message></Error>")
                self.send_response(503)
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)
                return
        upstream = http.client.HTTPConnection(self.server.upstream, timeout=30)
        headers = {k: v for k, v in self.headers.items() if k.lower() not in ("connection", "expect")}
        upstream.request(self.command, self.path, body=body, headers=headers)
        answer = upstream.getresponse()
        data = answer.read()
        self.send_response(answer.status)
        for key, value in answer.getheaders():
            if key.lower() not in ("transfer-encoding", "connection", "content-length", "server", "date"):
                self.send_header(key, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)
        upstream.close()

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _forward


@pytest.fixture
def throttled_s3(s3_endpoint, monkeypatch):
    """A fresh bucket on moto, reached through `_ThrottlingProxy`."""
    import boto3

    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket="retries")
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _ThrottlingProxy)
    server.upstream = s3_endpoint.removeprefix("http://")
    server.puts, server.fail_puts = 0, 0
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{server.server_address[1]}")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")  # botocore's layer: 2 tries a request
    yield server
    server.shutdown()
    server.server_close()


def test_s3_503s_are_retried_by_botocore_then_by_raybatch(throttled_s3, caplog):
    location = Location("s3://retries/out")
    assert location.fs.config_kwargs["retries"] == {"max_attempts": 2, "mode": "adaptive"}
    throttled_s3.fail_puts = 3  # botocore's 2 tries fail, then raybatch's retry: 1 more fails
    with caplog.at_level(logging.WARNING, logger="raybatch.storage"):
        location.write_atomic("parts/1.jsonl", b"line\n")
    assert throttled_s3.puts == 4
    assert len(caplog.records) == 1 and "s3://retries/out/parts/1.jsonl" in caplog.text
    assert location.list("parts") == ["1.jsonl"]
    assert location.read_bytes("parts/1.jsonl") == b"line\n"


def test_s3_writer_failing_mid_upload_leaves_nothing(throttled_s3, monkeypatch):
    location = Location("s3://retries/stream")
    monkeypatch.setattr(location.fs, "default_block_size", 5 * 2**20)
    with pytest.raises(KeyError):
        with location.open_atomic_writer("results.jsonl") as writer:
            writer.write(b"x" * (6 * 2**20))  # one part uploaded
            started = location.fs.call_s3("list_multipart_uploads", Bucket="retries")
            assert len(started["Uploads"]) == 1
            raise KeyError("producer failed")
    assert location.list() == []
    uploads = location.fs.call_s3("list_multipart_uploads", Bucket="retries")
    assert not uploads.get("Uploads")  # aborted, not left behind
