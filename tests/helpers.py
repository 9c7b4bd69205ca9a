"""Test helpers: input builders and the invariant checker every run is held to."""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from typing import NamedTuple, Optional

import fsspec


@dataclass
class Expected:
    """What one input line must become."""

    shard: str
    line: int
    custom_id: Optional[str]  # the custom_id echoed in the output (None: unreadable)
    error: Optional[str] = None  # error code, or None for a result row
    blank: bool = False


@dataclass
class InputBuilder:
    """Builds shards line by line and remembers what each line must become."""

    shards: dict[str, list[bytes]] = field(default_factory=dict)
    expected: list[Expected] = field(default_factory=list)

    def add(self, shard: str, raw, custom_id=None, error=None, blank=False, end=b"\n") -> None:
        data = raw if isinstance(raw, bytes) else json.dumps(raw).encode()
        lines = self.shards.setdefault(shard, [])
        lines.append(data + end)
        self.expected.append(Expected(shard, len(lines), custom_id, error, blank))

    def ok(self, shard: str, custom_id: str, body: dict, **top) -> None:
        self.add(shard, {"custom_id": custom_id, "body": body, **top}, custom_id)

    def write(self, url: str) -> None:
        fs, root = fsspec.core.url_to_fs(url)
        for name, lines in self.shards.items():
            fs.makedirs(f"{root.rstrip('/')}/{name}".rsplit("/", 1)[0], exist_ok=True)
            with fs.open(f"{root.rstrip('/')}/{name}", "wb") as handle:
                handle.write(b"".join(lines))

    def lines(self) -> list[Expected]:
        return [e for e in self.expected if not e.blank]


def read_jsonl(url: str) -> list[dict]:
    fs, path = fsspec.core.url_to_fs(url)
    data = fs.cat_file(path)
    assert data == b"" or data.endswith(b"\n"), "torn last line"
    return [json.loads(line) for line in data.splitlines()]


def check_run(
    output_url: str,
    expected: list[Expected],
    *,
    complete: bool = True,
    progress: Optional[dict] = None,
    cap_bytes: Optional[int] = None,
    calls_dir=None,
) -> dict:
    """The invariants every run is held to, whatever happened to it:

    - every non-blank input line is in exactly one of the two files (or, for a run that
      stopped early, in neither), with the expected outcome; no torn lines;
    - jobProgress equals the files (`progress`: the job's, from the API; by default the
      output's own progress.json);
    - the published files are exactly the committed parts, and their bytes are within
      `cap_bytes` when a cap was set;
    - with `calls_dir` (the scripted engine's call record): no line was sent to an
      engine after the part holding it was committed, so nothing committed was re-run.

    Returns {custom_id: result row}."""
    results = read_jsonl(f"{output_url}/results.jsonl")
    errors = read_jsonl(f"{output_url}/errors.jsonl")
    by_custom_id = {row["custom_id"]: row for row in results}
    assert len(by_custom_id) == len(results), "a custom_id appears twice in results"
    by_position = {}
    for row in errors:
        key = (row["error"]["file"], row["error"]["line"])
        assert key not in by_position, f"line {key} appears twice in errors"
        by_position[key] = row
    seen = 0
    for line in (e for e in expected if not e.blank):
        key = (line.shard, line.line)
        if line.error is None:
            in_results = line.custom_id in by_custom_id
            assert key not in by_position, f"{key} expected as a result, found error {by_position[key]['error']}"
            assert in_results or not complete, f"{key} ({line.custom_id}) missing from results"
            seen += in_results
        else:
            row = by_position.get(key)
            assert line.custom_id not in by_custom_id or _claimed_elsewhere(line, expected)
            if row is None:
                assert not complete, f"{key} missing from errors (expected {line.error})"
                continue
            assert row["error"]["code"] == line.error, f"{key}: {row['error']} != {line.error}"
            assert row["custom_id"] == line.custom_id
            assert row["response"] is None
            seen += 1
    assert seen == len(results) + len(errors), "output holds lines the input does not"
    if progress is None:
        progress_file = json.loads(fsspec.open(f"{output_url}/_raybatch/progress.json").open().read())
        progress = progress_file["progress"]
    assert progress["successfullyProcessedRequests"] == len(results)
    assert progress["failedRequests"] == len(errors)
    assert progress["totalProcessedRequests"] == len(results) + len(errors)
    assert progress["totalInputRequests"] == len([e for e in expected if not e.blank])
    usage = [r["response"]["body"]["usage"] for r in results]
    assert progress["inputTokens"] == sum(u["prompt_tokens"] for u in usage)
    assert progress["outputTokens"] == sum(u["completion_tokens"] for u in usage)
    assert progress["cachedInputTokenCount"] == sum(
        u["prompt_tokens_details"]["cached_tokens"] for u in usage
    )
    commits = _commit_records(output_url)
    published = sum(_size(f"{output_url}/{name}") for name in ("results.jsonl", "errors.jsonl"))
    assert published == sum(c["bytes"] for c in commits), "published files differ from the committed parts"
    assert cap_bytes is None or published <= cap_bytes, f"{published} bytes committed, cap {cap_bytes}"
    if calls_dir is not None:
        check_not_rerun([output_url], calls_dir)
    return by_custom_id


def check_not_rerun(output_urls: list[str], calls_dir) -> None:
    """No custom_id was sent to the engine after a part holding it was committed, in
    any of these outputs (one job's, or a continuation chain's)."""
    committed_at: dict[str, float] = {}
    for url in output_urls:
        for custom_id, at in committed_results(url).items():
            committed_at[custom_id] = min(at, committed_at.get(custom_id, at))
    for custom_id, calls in invocations(calls_dir).items():
        late = [call for call in calls if call.at > committed_at.get(custom_id, float("inf"))]
        assert not late, f"{custom_id} was answered again after its commit: {late}"


def committed_results(output_url: str) -> dict[str, float]:
    """custom_id → when the part holding its result was committed, read from the commit
    records (so it counts only committed parts, published or not)."""
    committed: dict[str, float] = {}
    for record in _commit_records(output_url):
        if record["results_file"]:
            for row in read_jsonl(f"{output_url}/{record['results_file']}"):
                committed[row["custom_id"]] = record["committed_at"]
    return committed


def _commit_records(output_url: str) -> list[dict]:
    fs, root = fsspec.core.url_to_fs(f"{output_url}/_raybatch/commits")
    if not fs.exists(root):
        return []
    return [json.loads(fs.cat_file(path)) for path in fs.ls(root, detail=False) if path.endswith(".json")]


def _size(url: str) -> int:
    fs, path = fsspec.core.url_to_fs(url)
    return fs.size(path)


def _claimed_elsewhere(line: Expected, expected: list[Expected]) -> bool:
    """A duplicate's custom_id is in results because an earlier line claimed it."""
    return line.error == "duplicate_custom_id"


TERMINAL = {"JOB_STATE_COMPLETED", "JOB_STATE_FAILED", "JOB_STATE_CANCELLED", "JOB_STATE_EXPIRED"}


def sdk_client(base_url: str, key: str, account: str):
    """The official Fireworks SDK, pointed at raybatch: only base_url and key change."""
    from fireworks import Fireworks

    return Fireworks(api_key=key, account_id=account, base_url=base_url, max_retries=0)


def wait_job(client, job_id: str, until=TERMINAL, timeout: float = 300.0, poll: float = 0.5):
    """Poll until the job's state is in `until`; returns (job, every state seen in order)."""
    seen: list[str] = []
    deadline = time.monotonic() + timeout
    while True:
        job = client.batch_inference_jobs.get(job_id)
        if not seen or seen[-1] != job.state:
            seen.append(job.state)
        if job.state in until:
            return job, seen
        assert job.state not in TERMINAL, f"job ended {job.state} ({job.status}) before reaching {until}"
        assert time.monotonic() < deadline, f"job still {job.state} after {timeout}s (seen {seen})"
        time.sleep(poll)


def dataset_files_url(storage: str, account: str, dataset_name: str) -> str:
    return f"{storage}/accounts/{account}/datasets/{dataset_name.rsplit('/', 1)[-1]}/files"


class Call(NamedTuple):
    pid: int  # the engine process that was asked
    at: float  # when (epoch seconds)


def invocations(folder) -> dict[str, list[Call]]:
    """The scripted engine's record: custom_id → every call for it, in time order."""
    calls: dict[str, list[Call]] = {}
    if not os.path.isdir(folder):
        return calls
    for name in os.listdir(folder):
        custom_id_hex, pid, _ = name.split(".")
        with open(os.path.join(folder, name)) as record:
            # Empty only while the call is being recorded: a call of now, never late.
            at = float(record.read() or 0)
        calls.setdefault(bytes.fromhex(custom_id_hex).decode(), []).append(Call(int(pid), at))
    return {custom_id: sorted(found, key=lambda c: c.at) for custom_id, found in calls.items()}


class Faults:
    """The test side of `raybatch.faults`: arm, see what fired, disarm."""

    def __init__(self, folder):
        self.folder = str(folder)
        os.makedirs(self.folder, exist_ok=True)

    def arm(self, point: str, **spec) -> None:
        """`arm("engine.kill", after=3)`, `arm("storage.error", rate=0.05)`. Written
        whole (beside, then renamed) so no process reads half a spec."""
        path = os.path.join(self.folder, f"{point}.json")
        with open(path + ".tmp", "w") as handle:
            json.dump(spec, handle)
        os.replace(path + ".tmp", path)

    def fired(self, point: str) -> bool:
        return os.path.exists(os.path.join(self.folder, f"{point}.fired"))

    def fired_at(self, point: str) -> float:
        """When the fault fired (epoch seconds)."""
        return os.path.getmtime(os.path.join(self.folder, f"{point}.fired"))

    def storage_errors(self) -> int:
        """How many storage errors were injected since the last clear."""
        log = os.path.join(self.folder, "storage.error.log")
        return sum(1 for _ in open(log)) if os.path.exists(log) else 0

    def clear(self) -> None:
        for name in os.listdir(self.folder):
            os.remove(os.path.join(self.folder, name))


def _traced(function, args, warm_up):
    import tracemalloc

    if warm_up is not None:
        function(*warm_up)
    tracemalloc.start()
    result = function(*args)
    return tracemalloc.get_traced_memory()[1], result


def peak_python_memory(function, *args, warm_up: Optional[tuple] = None):
    """(peak bytes Python allocated while `function(*args)` ran, its result), measured in a
    fresh process: tracemalloc counts every thread's allocations, and the test process may
    hold a moto server or a Ray driver whose threads allocate at any moment. `warm_up`:
    arguments of a first, untraced call, so that lazy imports are not counted."""
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(_traced, (function, args, warm_up))
