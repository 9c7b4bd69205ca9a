"""Fault injection for the reliability tests. Inert unless RAYBATCH_FAULTS is set.

Every raybatch process (API replicas, the scheduler, job drivers, the writer and engine
actors, read tasks) inherits RAYBATCH_FAULTS from the environment its Ray cluster was
started in, so a test sets it once, before `raybatch up` or `ray.init`, and then arms
faults at run time, one file per fault in that folder:

    {folder}/{point}.json    {"after": N}   fire once, at the N-th time one process
                                            reaches the point (or any time after)
                             {"rate": p}    fire with probability p each time, until the
                                            test removes the file

Points, and where they are checked:

    engine.kill      ScriptedEngine.generate: SIGKILL its own process (the actor dies)
    engine.die       ScriptedEngine.generate: EngineFailure (engine dead, actor alive)
    engine.hang      ScriptedEngine.generate: never answer (the request timeout catches it)
    engine.poison    ScriptedEngine.generate: {"custom_id": ID, "fault": "die" | "hang"}:
                     every request for that row kills or hangs the engine (a poison row)
    engine.gate      ScriptedEngine.generate: while armed, no request starts (a test
                     queues several jobs' rows, then disarms it to release them at once)
    engine.start_hang  ScriptedEngine.__init__: the engine's start never ends (the
                     pool's start timeout catches it); N counts starts, one per process
    writer.crash     OutputWriter: exit between writing a part and committing it
                     (N counts the parts this writer wrote)
    publish.crash    output_layout.publish_files: exit at step N of a publish (1, 2:
                     after each result file; 3: after published.json; 4 on: after
                     each part removed)
    storage.error    storage.retrying: a transient ConnectionResetError, raised before the
                     storage call or after it took effect (a lost reply), at rate p

A once-only fault is claimed by renaming its file to `{point}.fired`: atomic, so exactly
one process fires it, and the test can see that it did, and when (the file's time).
Every storage error injected is logged as a line of `storage.error.log`, so a test can
count them.
"""

from __future__ import annotations

import json
import os
import random
from typing import Optional

FOLDER_VARIABLE = "RAYBATCH_FAULTS"


def _armed(point: str) -> Optional[tuple[str, dict]]:
    folder = os.environ.get(FOLDER_VARIABLE)
    if not folder:
        return None
    path = os.path.join(folder, f"{point}.json")
    try:
        with open(path) as handle:
            return path, json.load(handle)
    except (OSError, ValueError):  # not armed (or just disarmed)
        return None


def spec(point: str) -> Optional[dict]:
    """The armed spec of a point that stays armed (checked on every call), or None."""
    armed = _armed(point)
    return armed[1] if armed else None


def fires(point: str, count: int) -> bool:
    """True exactly once across all processes: for the first caller whose `count` (how
    often this process reached the point) is at least the armed `after`."""
    armed = _armed(point)
    if armed is None:
        return False
    path, armed_spec = armed
    if "after" not in armed_spec or count < armed_spec["after"]:
        return False
    fired = path[: -len(".json")] + ".fired"
    try:
        os.rename(path, fired)
    except FileNotFoundError:
        return False  # another process claimed it first
    # Its time is now when the fault fired, not when it was armed; its text, the process
    # that fired it (with several engines, the tests' only sure way to tell which broke).
    # Written to a new file and renamed over: another process may have opened the armed
    # file just before the rename and still be reading it, and truncating that same file
    # would hand it this pid instead of the spec.
    record_path = f"{fired}.{os.getpid()}"
    with open(record_path, "w") as record:
        record.write(str(os.getpid()))
    os.replace(record_path, fired)
    return True


def maybe_storage_error(operation: str, where: str, phase: str) -> None:
    """Raise a transient storage error at the armed rate. `phase` is "before" (the call
    never happened) or "after" (it took effect, and the reply is lost)."""
    armed = _armed("storage.error")
    if armed is None or random.random() >= float(armed[1].get("rate", 0)):
        return
    with open(armed[0][: -len(".json")] + ".log", "a") as log:
        log.write(f"{os.getpid()} {phase} {operation} {where}\n")
    raise ConnectionResetError(f"injected transient storage error ({phase} {operation})")
