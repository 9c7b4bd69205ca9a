"""Issue 10, item 7: validation of large datasets in the background (no cluster).

`BackgroundValidations` on a local store: a small dataset answers READY within the wait;
a held-up one answers UPLOADING with its progress in `status.message`, then becomes
READY; failures leave the dataset UPLOADING with the exact reason in its status and
nothing lost; a run whose replica stopped is run again by the next GET, and gives up
(ABORTED) after MAX_RESTARTS; the files cannot change while a validation runs."""

from __future__ import annotations

import gzip
import io
import threading
import time

import pytest

from raybatch.api.auth import create_key
from raybatch.api.datasets import DatasetService
from raybatch.api.validation import MAX_RESTARTS, VALIDATION, BackgroundValidations, ValidationRecord
from raybatch.config import ServiceConfig
from raybatch.exceptions import FailedPrecondition, PayloadTooLarge
from raybatch.resources import DatasetFields
from raybatch.store import Store

LINE = b'{"custom_id": "a", "body": {"messages": [{"role": "user", "content": "hi"}]}}\n'
LINES = 20_000  # > 8192: the "lines" phase reports before the end of the file


def _world(tmp_path, **settings):
    store = Store(str(tmp_path / "storage"))
    config = ServiceConfig(storage=store.root_url, **settings)
    datasets = DatasetService(store, config)
    validations = BackgroundValidations(store, datasets, config)
    _, record = create_key(store, "acme")
    return store, datasets, validations, record.key_id


@pytest.fixture
def world(tmp_path):
    return _world(tmp_path, validation_wait_seconds=0.5, validation_stale_seconds=1.0)


def _signed_upload(store, datasets, key_id, dataset_id: str, data: bytes, name: str = "in.jsonl") -> None:
    datasets.create("acme", dataset_id, DatasetFields(), key_id)
    nonce, _ = datasets.upload_plan("acme", dataset_id, {name: len(data)}, key_id)
    store.location.write_atomic(f"{store.dataset_uploads('acme', dataset_id)}/{nonce}/{name}", data)


def _hold_at(datasets, phase: str) -> tuple[threading.Event, threading.Event]:
    """Make validations stop at their first report of `phase` until released."""
    reached, release = threading.Event(), threading.Event()
    validate = datasets.validate

    def held(account, dataset_id, progress=None):
        def report(now_phase, read, stored, lines):
            progress(now_phase, read, stored, lines)
            if now_phase == phase and not release.is_set():
                reached.set()
                assert release.wait(20)

        return validate(account, dataset_id, report)

    datasets.validate = held
    return reached, release


def _view(validations, datasets, dataset_id: str):
    return validations.view(datasets.get("acme", dataset_id))


def _until(check, seconds: float = 10.0):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError("condition not met in time")


def test_a_small_dataset_is_ready_in_the_answer(world):
    store, datasets, validations, key_id = world
    _signed_upload(store, datasets, key_id, "small", LINE * 3)
    dataset = validations.validate("acme", "small")
    assert dataset.state.value == "READY" and dataset.example_count == "3"
    assert dataset.status.code == "OK" and dataset.status.message == ""
    assert not store.location.exists(f"accounts/acme/datasets/small/{VALIDATION}")
    # Again on the READY dataset (issue 12): the same dataset, nothing run or changed.
    again = validations.validate("acme", "small")
    assert again == dataset and not store.location.exists(f"accounts/acme/datasets/small/{VALIDATION}")


def test_a_large_dataset_answers_uploading_shows_progress_then_is_ready(world):
    store, datasets, validations, key_id = world
    _signed_upload(store, datasets, key_id, "big", gzip.compress(LINE * LINES))
    reached, release = _hold_at(datasets, "lines")
    started = time.monotonic()
    answer = validations.validate("acme", "big")
    assert time.monotonic() - started < 2.0
    assert answer.state.value == "UPLOADING" and answer.status.message.startswith("validating"), answer.status
    assert reached.wait(10)
    time.sleep(1.0)  # a heartbeat has written the progress
    shown = _view(validations, datasets, "big")
    assert shown.state.value == "UPLOADING"
    assert shown.status.code == "OK"
    assert shown.status.message.startswith("validating: counting lines, ") and "8192 lines so far" in shown.status.message, shown.status
    assert f" of {len(LINE) * LINES} bytes read (" in shown.status.message, shown.status  # of the expanded size
    # The SDK's model parses what GET sends.
    from fireworks.types import Dataset as SdkDataset

    wire = shown.model_dump(mode="json", by_alias=True, exclude_none=True)
    assert SdkDataset.model_validate(wire).status.message == shown.status.message
    # Meanwhile the files cannot change.
    with pytest.raises(FailedPrecondition, match="being validated"):
        datasets.upload_plan("acme", "big", {"in.jsonl": 10}, key_id)
    with pytest.raises(FailedPrecondition, match="being validated"):
        datasets.store_upload("acme", "big", "more.jsonl", io.BytesIO(LINE))
    with pytest.raises(FailedPrecondition, match="being validated"):
        datasets.delete("acme", "big")
    # A second :validateUpload joins the run.
    assert validations.validate("acme", "big").state.value == "UPLOADING"
    release.set()
    ready = _until(lambda: (d := _view(validations, datasets, "big")).state.value == "READY" and d)
    assert ready.example_count == str(LINES) and ready.status.message == ""
    assert _until(lambda: not store.location.exists(f"accounts/acme/datasets/big/{VALIDATION}"))
    assert store.dataset_files("acme", "big").list() == ["in.jsonl"]


def test_the_replica_validating_shows_its_progress_at_once_and_others_within_a_beat(tmp_path):
    store, datasets, validations, key_id = _world(tmp_path, validation_wait_seconds=0.1,
                                                   validation_stale_seconds=40.0)  # one beat a second
    other_replica = BackgroundValidations(store, DatasetService(store, validations._config), validations._config)
    _signed_upload(store, datasets, key_id, "big", gzip.compress(LINE * LINES))
    reached, release = _hold_at(datasets, "lines")
    validations.validate("acme", "big")
    assert reached.wait(10)
    # No heartbeat has written "lines" yet; the owning replica's GET shows it anyway.
    assert "8192 lines so far" in _view(validations, datasets, "big").status.message
    # Another replica reads the record, which the next beat brings up to date.
    assert _until(lambda: "8192 lines so far" in _view(other_replica, datasets, "big").status.message, 5.0)
    release.set()
    assert _until(lambda: _view(validations, datasets, "big").state.value == "READY")


def test_a_failure_in_the_background_is_the_status_and_nothing_is_lost(tmp_path):
    store, datasets, validations, key_id = _world(tmp_path, validation_wait_seconds=0, max_dataset_bytes=len(LINE) * 100)
    bomb = gzip.compress(LINE * 1000)  # small stored, expands past the limit
    _signed_upload(store, datasets, key_id, "bomb", bomb)
    assert validations.validate("acme", "bomb").state.value == "UPLOADING"
    failed = _until(lambda: (d := _view(validations, datasets, "bomb")).status.code != "OK" and d)
    assert failed.state.value == "UPLOADING"
    assert failed.status.code == "RESOURCE_EXHAUSTED"
    assert failed.status.message == (f"dataset expands to more than its limit of {len(LINE) * 100} bytes "
                                     "(gzip files count decompressed; in.jsonl passed it)")
    # Nothing published, nothing lost: the file waits, claimed, for the next try.
    assert store.dataset_files("acme", "bomb").list() == []
    assert store.location.read_bytes("accounts/acme/datasets/bomb/validating/in.jsonl") == bomb
    assert not store.location.exists(f"accounts/acme/datasets/bomb/{VALIDATION}")
    # The next :validateUpload runs again (and, the file being what it is, fails again).
    roomy = DatasetService(store, ServiceConfig(storage=store.root_url))
    assert roomy.validate("acme", "bomb").example_count == "1000"  # same bytes, a larger limit


def test_a_failure_within_the_wait_is_the_answer(world):
    store, datasets, validations, key_id = world
    datasets.create("acme", "empty", DatasetFields(), key_id)
    datasets.upload_plan("acme", "empty", {"in.jsonl": 10}, key_id)
    with pytest.raises(FailedPrecondition, match="registered but not uploaded"):
        validations.validate("acme", "empty")
    assert _view(validations, datasets, "empty").status.code == "FAILED_PRECONDITION"


def test_a_failed_upload_in_the_background_leaves_nothing(tmp_path):
    store, datasets, validations, key_id = _world(tmp_path, validation_wait_seconds=0, max_dataset_bytes=len(LINE) * 100)
    datasets.create("acme", "posted", DatasetFields(), key_id)
    datasets.store_upload("acme", "posted", "in.jsonl", io.BytesIO(gzip.compress(LINE * 1000)))
    validations.validate("acme", "posted", ["in.jsonl"])
    failed = _until(lambda: (d := _view(validations, datasets, "posted")).status.code != "OK" and d)
    assert failed.status.code == "RESOURCE_EXHAUSTED" and failed.state.value == "UPLOADING"
    assert store.dataset_files("acme", "posted").list() == []


def test_a_validation_whose_replica_stopped_is_run_again_by_a_get(world):
    store, datasets, validations, key_id = world
    _signed_upload(store, datasets, key_id, "orphan", LINE * 5)
    # What a replica that died mid-validation leaves: its record, beating no more.
    long_ago = time.time() - 60
    record = ValidationRecord(run_id="dead", started=long_ago, heartbeat=long_ago, phase="lines", done=10, total=20)
    store.location.write_atomic(f"accounts/acme/datasets/orphan/{VALIDATION}", record.model_dump_json().encode())
    shown = _view(validations, datasets, "orphan")  # another replica's GET
    assert shown.state.value == "UPLOADING" and "restarted 1x" in shown.status.message
    ready = _until(lambda: (d := _view(validations, datasets, "orphan")).state.value == "READY" and d)
    assert ready.example_count == "5"


def test_a_live_validation_of_another_replica_is_left_alone(world):
    store, datasets, validations, key_id = world
    _signed_upload(store, datasets, key_id, "theirs", LINE)
    record = ValidationRecord(run_id="other-replica", started=time.time(), heartbeat=time.time(), phase="size", done=100)
    store.location.write_atomic(f"accounts/acme/datasets/theirs/{VALIDATION}", record.model_dump_json().encode())
    assert validations.validate("acme", "theirs").status.message == "validating: measuring the expanded size, 100 bytes so far"
    assert datasets.get("acme", "theirs").state.value == "UPLOADING"  # not run here


def test_too_many_interruptions_abort_until_validate_upload_is_called_again(world):
    store, datasets, validations, key_id = world
    _signed_upload(store, datasets, key_id, "cursed", LINE)
    long_ago = time.time() - 60
    record = ValidationRecord(run_id="dead", started=long_ago, heartbeat=long_ago, restarts=MAX_RESTARTS)
    store.location.write_atomic(f"accounts/acme/datasets/cursed/{VALIDATION}", record.model_dump_json().encode())
    shown = _view(validations, datasets, "cursed")
    assert shown.status.code == "ABORTED" and "call :validateUpload again" in shown.status.message
    assert datasets.get("acme", "cursed").status.code == "ABORTED"  # stored, not only shown
    assert validations.validate("acme", "cursed").state.value == "READY"


def test_a_superseded_run_publishes_nothing(world):
    store, datasets, validations, key_id = world
    _signed_upload(store, datasets, key_id, "taken", LINE * 3)
    # No heartbeat here: one written between its check and its write would take the
    # validation back (the old run then goes on, the new one stops: still one owner).
    # The run's own check before publishing is what this test is about.
    validations._beat_seconds = 3600
    reached, release = _hold_at(datasets, "lines")
    validations.validate("acme", "taken")
    assert reached.wait(10)
    # Another replica took it over (its record names another run).
    other = ValidationRecord(run_id="newer", started=time.time(), heartbeat=time.time() + 3600)
    store.location.write_atomic(f"accounts/acme/datasets/taken/{VALIDATION}", other.model_dump_json().encode())
    release.set()
    _until(lambda: not validations._runs)  # the run has ended
    assert datasets.get("acme", "taken").state.value == "UPLOADING"
    assert store.dataset_files("acme", "taken").list() == []
    assert ValidationRecord.model_validate_json(
        store.location.read_bytes(f"accounts/acme/datasets/taken/{VALIDATION}")).run_id == "newer"


def test_a_put_under_way_cannot_change_what_was_measured(world):
    """Validation takes the registered file out of the upload area first: a PUT landing
    there afterwards (same URL, same size) is never published."""
    store, datasets, validations, key_id = world
    good, bad = LINE * 3, gzip.compress(LINE * 3).ljust(len(LINE) * 3, b"\0")[: len(LINE) * 3]
    _signed_upload(store, datasets, key_id, "raced", good)
    nonce = datasets.registration("acme", "raced")["nonce"]
    reached, release = _hold_at(datasets, "lines")
    validations.validate("acme", "raced")
    assert reached.wait(10)
    store.location.write_atomic(f"{store.dataset_uploads('acme', 'raced')}/{nonce}/in.jsonl", bad)
    release.set()
    _until(lambda: datasets.get("acme", "raced").state.value == "READY")
    assert store.dataset_files("acme", "raced").open_read("in.jsonl").read() == good


def test_payload_too_large_on_stored_bytes_is_immediate(world):
    store, datasets, validations, key_id = world
    config = ServiceConfig(storage=store.root_url, max_dataset_bytes=len(LINE))
    small = DatasetService(store, config)
    small_validations = BackgroundValidations(store, small, config)
    datasets.create("acme", "toobig", DatasetFields(), key_id)
    store.dataset_files("acme", "toobig").write_atomic("in.jsonl", LINE * 2)
    with pytest.raises(PayloadTooLarge, match="over its limit"):
        small_validations.validate("acme", "toobig")


def test_a_validation_waiting_for_a_slot_answers_at_once(tmp_path):
    store, datasets, validations, key_id = _world(tmp_path, validation_wait_seconds=0.5, max_concurrent_validations=1)
    _signed_upload(store, datasets, key_id, "first", LINE * 3)
    _signed_upload(store, datasets, key_id, "second", LINE * 4)
    reached, release = _hold_at(datasets, "lines")
    validations.validate("acme", "first")
    assert reached.wait(10)
    started = time.monotonic()
    queued = validations.validate("acme", "second")
    assert time.monotonic() - started < 2.0
    assert queued.status.message == "validating: waiting for a free validation slot", queued.status
    release.set()
    _until(lambda: all(datasets.get("acme", d).state.value == "READY" for d in ("first", "second")))
