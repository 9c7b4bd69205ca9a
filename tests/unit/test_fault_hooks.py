"""The fault-injection hooks the reliability tests arm (raybatch/faults.py): inert
without RAYBATCH_FAULTS, once-only faults fire for exactly one caller across processes,
and injected storage errors are retried away without a duplicate or a torn file."""

from __future__ import annotations

import os
import time
from concurrent.futures import ProcessPoolExecutor

import pytest

from raybatch import faults
from raybatch.exceptions import StorageUnavailable
from raybatch.storage import Location
from tests.helpers import Faults


@pytest.fixture
def armed(tmp_path, monkeypatch) -> Faults:
    monkeypatch.setenv(faults.FOLDER_VARIABLE, str(tmp_path / "faults"))
    monkeypatch.setenv("RAYBATCH_STORAGE_RETRY_DELAY", "0")
    return Faults(tmp_path / "faults")


def test_nothing_fires_without_the_variable(tmp_path, monkeypatch):
    monkeypatch.delenv(faults.FOLDER_VARIABLE, raising=False)
    Faults(tmp_path).arm("engine.kill", after=1)
    assert not faults.fires("engine.kill", 10)


def test_a_once_only_fault_fires_at_its_count_and_then_never(armed):
    armed.arm("writer.crash", after=2)
    os.utime(os.path.join(armed.folder, "writer.crash.json"), (0, 0))  # armed long ago
    assert not faults.fires("writer.crash", 1)
    assert faults.fires("writer.crash", 2)
    assert armed.fired("writer.crash")
    assert time.time() - os.path.getmtime(os.path.join(armed.folder, "writer.crash.fired")) < 60
    assert not faults.fires("writer.crash", 3)


def _race(folder: str) -> bool:
    os.environ[faults.FOLDER_VARIABLE] = folder
    return faults.fires("engine.die", 5)


def test_exactly_one_process_claims_a_fault(armed):
    armed.arm("engine.die", after=1)
    with ProcessPoolExecutor(4) as pool:
        claims = list(pool.map(_race, [armed.folder] * 16))
    assert claims.count(True) == 1


def test_injected_storage_errors_are_retried_without_a_trace(armed, tmp_path, monkeypatch):
    monkeypatch.setenv("RAYBATCH_STORAGE_RETRIES", "60")
    armed.arm("storage.error", rate=0.5)
    out = Location(str(tmp_path / "out"))
    for i in range(20):
        out.write_atomic(f"part-{i}", b"x" * i)
    assert armed.storage_errors() > 0
    armed.clear()
    assert out.list() == sorted(f"part-{i}" for i in range(20))  # no temporary file left
    assert all(out.read_bytes(f"part-{i}") == b"x" * i for i in range(20))


def test_storage_errors_that_never_stop_are_reported(armed, tmp_path, monkeypatch):
    monkeypatch.setenv("RAYBATCH_STORAGE_RETRIES", "3")
    armed.arm("storage.error", rate=1.0)
    with pytest.raises(StorageUnavailable, match="after 3 attempts.*injected transient storage error"):
        Location(str(tmp_path)).read_bytes("anything")
    assert armed.storage_errors() == 3
