"""Test helpers shared by the test files (no test file imports another): input builders,
the invariant checker every run is held to, `wait_until`, the mixed input of the engine
tests, the service the integration tests run against, and fault arming."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator, NamedTuple, Optional, TypeVar

import fsspec
import pyarrow as pa

from raybatch.config import EngineConfig
from raybatch.pipeline.rows import OUTPUT_SCHEMA

T = TypeVar("T")


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


def wait_until(predicate: Callable[[], T], timeout: float = 60.0, interval: float = 0.2, message: str = "") -> T:
    """Call `predicate` every `interval` seconds until it returns something true, and
    return that; fail the test with `message` once `timeout` seconds have passed."""
    deadline = time.monotonic() + timeout
    while not (result := predicate()):
        assert time.monotonic() < deadline, message or f"still not true after {timeout:g}s"
        time.sleep(interval)
    return result


def validation_outcome(reply, get_dataset: Callable[[], dict], timeout: float = 300.0) -> tuple[int, str, str]:
    """How a `:validateUpload` or `:upload` ended: (HTTP status, status name, message).
    A validation that ended within the request's wait is its answer; one that went on in
    the background (answered 200, UPLOADING) ends in the dataset's GET: READY is
    (200, "OK", ""), a failure (400, its status code, its message)."""
    if reply.status_code != 200:
        error = reply.json()["error"]
        return reply.status_code, error["status"], error["message"]
    def ended() -> Optional[dict]:
        dataset = get_dataset()
        return dataset if dataset["state"] == "READY" or dataset["status"]["code"] != "OK" else None

    dataset = wait_until(ended, timeout=timeout, interval=0.5, message="the dataset is still validating")
    if dataset["state"] == "READY":
        return 200, "OK", ""
    return 400, dataset["status"]["code"], dataset["status"]["message"]


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
    # An embedding's usage (OpenAI's shape) has prompt_tokens and total_tokens only.
    assert progress["outputTokens"] == sum(u.get("completion_tokens", 0) for u in usage)
    assert progress["cachedInputTokenCount"] == sum(
        u.get("prompt_tokens_details", {}).get("cached_tokens", 0) for u in usage
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
    records = sorted(_commit_records(output_url), key=lambda record: record["seq"])
    # A published output has no parts any more: results.jsonl holds them in commit
    # order, each record's `results` lines one after the other.
    fs, published_path = fsspec.core.url_to_fs(f"{output_url}/_raybatch/published.json")
    published = json.loads(fs.cat_file(published_path)) if fs.exists(published_path) else {"through_seq": 0}
    published_rows = iter(read_jsonl(f"{output_url}/results.jsonl")) if published["through_seq"] else iter(())
    for record in records:
        if record["seq"] <= published["through_seq"]:
            rows = [next(published_rows) for _ in range(record["results"])]
        elif record["results_file"]:
            rows = read_jsonl(f"{output_url}/{record['results_file']}")
        else:
            rows = []
        for row in rows:
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



# The mixed input of the engine tests: every bad-line kind and every request feature
# in one input, so that one engine start covers them all.

MAX_LINE_BYTES = 4096
MAX_MODEL_LEN = 512
# Eager mode starts the CPU engine in ~25 s instead of ~75 s; decoding is slower, which
# these small inputs do not notice.
# vLLM's "hermes" tool-call parser, which the tiny model's template and tokens are made for.
ENGINE = EngineConfig(max_model_len=MAX_MODEL_LEN, engine_args={"enforce_eager": True, "tool_call_parser": "hermes"})
SCHEMA = {
    "type": "object",
    "properties": {"color": {"enum": ["red", "green", "blue"]}},
    "required": ["color"],
    "additionalProperties": False,
}


def chat(text: str, **sampling) -> dict:
    return {"messages": [{"role": "user", "content": text}], **sampling}


# Tools (tests/integration/test_run_engine.py): `strict` pins the arguments to the
# schema, as OpenAI and vLLM do, so a forced call of the random model is a valid one.
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather of a city",
        "parameters": {"type": "object", "properties": {"city": {"enum": ["Paris", "Rome"]}},
                       "required": ["city"], "additionalProperties": False},
        "strict": True,
    },
}
CLOCK_TOOL = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}
TOOL_HISTORY = [
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
]


def tool_rows(b: InputBuilder, shard: str) -> None:
    tools = [WEATHER_TOOL, CLOCK_TOOL]
    # The tools block takes ~375 of the 512-token context.
    forced = {"max_tokens": 100, "temperature": 1.0, "parallel_tool_calls": False}
    b.ok(shard, "tool-required", chat("Weather in Paris?", tools=tools, tool_choice="required", seed=1, **forced))
    named = {"type": "function", "function": {"name": "get_weather"}}
    b.ok(shard, "tool-named", chat("Weather in Rome?", tools=tools, tool_choice=named, seed=2, **forced))
    b.ok(shard, "tool-history", {"messages": TOOL_HISTORY, "tools": tools, "tool_choice": "none", "max_tokens": 6, "ignore_eos": True})
    b.ok(shard, "tool-auto", chat("Weather?", tools=tools, max_tokens=6, seed=3))
    b.add(shard, {"custom_id": "tool-unknown", "body": chat("x", tools=tools, tool_choice={"type": "function", "function": {"name": "nope"}})},
          "tool-unknown", "invalid_request")
    b.add(shard, {"custom_id": "tools-not-list", "body": chat("x", tools=WEATHER_TOOL)}, "tools-not-list", "invalid_request")


def mixed_input() -> InputBuilder:
    b = InputBuilder()
    a = "a.jsonl"
    # The first line carries a UTF-8 BOM and ends in CRLF.
    b.add(a, b"\xef\xbb\xbf" + json.dumps({"custom_id": "bom-crlf", "body": chat("hi")}).encode(), "bom-crlf", end=b"\r\n")
    b.ok(a, "greedy-a", chat("Tell me a story.", temperature=0, max_tokens=12))
    b.ok(a, "greedy-b", chat("Tell me a story.", temperature=0, max_tokens=12))
    b.ok(a, "seeded-a", chat("Roll a die.", temperature=1.0, seed=42, max_tokens=12))
    b.ok(a, "seeded-b", chat("Roll a die.", temperature=1.0, seed=42, max_tokens=12))
    b.ok(a, "n-three", chat("Three colors.", n=3, max_tokens=6, ignore_eos=True))
    b.ok(a, "job-defaults", chat("Use the job's max_tokens.", ignore_eos=True))
    b.ok(a, "own-max", chat("Use my own max_tokens.", max_tokens=5, ignore_eos=True))
    b.ok(a, "completion-text", {"prompt": "The quick brown fox", "max_tokens": 8}, url="/v1/completions", method="POST")
    b.ok(a, "completion-ids", {"prompt": [5, 6, 7, 8], "max_tokens": 4, "logprobs": 2}, url="/v1/completions")
    b.ok(a, "schema", chat("A color as JSON.", max_tokens=40, seed=3, response_format={"type": "json_schema", "json_schema": {"name": "c", "schema": SCHEMA}}))
    b.ok(a, "json-object", chat("Any JSON object.", max_tokens=60, temperature=0, response_format={"type": "json_object"}))
    b.ok(a, "logprobs", chat("With logprobs.", max_tokens=4, logprobs=True, top_logprobs=2))
    tool_rows(b, a)
    b.add(a, b"", blank=True)
    b.add(a, b'{"custom_id": "cut", "body": {', None, "invalid_json")
    b.add(a, b'{"custom_id": "bad-utf8", "body": "\xff\xfe"}', None, "invalid_json")
    b.add(a, b"[1, 2, 3]", None, "invalid_request")
    b.add(a, {"body": chat("no id")}, None, "missing_custom_id")
    b.add(a, {"custom_id": "", "body": chat("empty id")}, None, "missing_custom_id")
    b.add(a, {"custom_id": 5, "body": chat("numeric id")}, None, "missing_custom_id")
    b.add(a, {"custom_id": "bom-crlf", "body": chat("again")}, "bom-crlf", "duplicate_custom_id")
    b.add(a, {"custom_id": "no-body"}, "no-body", "invalid_request")
    b.add(a, {"custom_id": "messages-string", "body": {"messages": "hello"}}, "messages-string", "invalid_request")
    b.add(a, {"custom_id": "prompt-object", "url": "/v1/completions", "body": {"prompt": {"x": 1}}}, "prompt-object", "invalid_request")
    b.add(a, {"custom_id": "moderations", "url": "/v1/moderations", "body": {"input": "x"}}, "moderations", "invalid_request")
    # A chat model refuses embeddings rows (tests/integration/test_embeddings.py: the reverse).
    b.add(a, {"custom_id": "embeddings", "url": "/v1/embeddings", "body": {"input": "x"}}, "embeddings", "unsupported_url_for_model")
    b.add(a, {"custom_id": "huge", "body": chat("x" * MAX_LINE_BYTES)}, None, "line_too_large")
    b.add(a, {"custom_id": "long-prompt", "body": chat("word " * 700, max_tokens=4)}, "long-prompt", "context_length_exceeded")
    b.add(a, {"custom_id": "too-many-tokens", "body": chat("hi", max_tokens=MAX_MODEL_LEN)}, "too-many-tokens", "context_length_exceeded")
    b.add(a, {"custom_id": "negative-max", "body": chat("hi", max_tokens=-1)}, "negative-max", "invalid_request")
    b.add(a, b'{"custom_id": "nan-temperature", "body": {"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}}', "nan-temperature", "invalid_request")
    b.add(a, {"custom_id": "n-too-big", "body": chat("hi", n=17)}, "n-too-big", "n_too_large")
    b.add(a, {"custom_id": "string-max", "body": chat("hi", max_tokens="5")}, "string-max", "invalid_request")
    # A second shard: a duplicate across shards (the first shard's line wins), a last
    # line with no newline, and a whitespace-only line.
    s = "sub/b.jsonl"
    b.add(s, {"custom_id": "greedy-a", "body": chat("dup across shards")}, "greedy-a", "duplicate_custom_id")
    b.add(s, b"   \t", blank=True)
    b.ok(s, "last-no-newline", chat("end", max_tokens=3))
    b.shards[s][-1] = b.shards[s][-1].rstrip(b"\n")
    return b

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



# The service the integration tests run against (the `service` fixture in conftest.py).

# The tiny Llama as an embedding model (vLLM's pooling runner, last-token pooling),
# claiming Matryoshka sizes so that `dimensions` is served. Started by the first
# embeddings job (test_embeddings.py), whose `raybatch run` shares the service's
# replica by asking for the same engine; it idles out a minute after its last row.
EMBED_ENGINE = {
    "task": "embed", "max_model_len": MAX_MODEL_LEN, "idle_seconds": 60,
    "engine_args": {"enforce_eager": True, "hf_overrides": {"matryoshka_dimensions": [32, 64, 128, 256]}},
}
SERVICE_MODELS = {
    # The real engine: vLLM CPU on the tiny model (eager: starts in ~25 s, not ~70 s),
    # kept warm from service start, as an operator would keep a busy model.
    "tiny": {"source": "{tiny}", "engine": {"min_replicas": 1, "engine_args": {"enforce_eager": True, "tool_call_parser": "hermes"}}},
    "tiny-embed": {"source": "{tiny}", "engine": EMBED_ENGINE},
    # The deterministic test engine, one row at a time, so a job takes a known time.
    "scripted-slow": {
        "source": "scripted",
        "engine": {"kind": "scripted", "batch_size": 1, "concurrent_batches": 1,
                   "engine_args": {"seconds_per_request": 1.0}},
    },
    "scripted": {"source": "scripted", "engine": {"kind": "scripted"}},
    # A catalog entry whose files are missing: the job fails at VALIDATING, saying so.
    "no-files": {"source": "/nowhere/model"},
    # An engine that fails every start: the job fails with the engine's error.
    "scripted-broken": {"source": "scripted", "engine": {"kind": "scripted", "engine_args": {"fail_to_start": True}}},
    # An engine whose start hangs: killed after its start timeout, 3 times, then the job fails.
    "scripted-stuck": {"source": "scripted", "engine": {"kind": "scripted", "start_timeout_seconds": 2,
                                                        "engine_args": {"hang_at_start": True}}},
    # Slow, and recording every call under {home}/calls (the cluster-restart test).
    "scripted-counted": {
        "source": "scripted",
        "engine": {"kind": "scripted", "batch_size": 1, "concurrent_batches": 1,
                   "engine_args": {"seconds_per_request": 0.5, "invocations_dir": "{home}/calls"}},
    },
}
# Fireworks model names (test_api_conformance.py): an entry keyed by the Hugging Face ID
# that the shipped table maps llama-v3p1-8b-instruct to, and one with the operator's own
# aliases (one of them overriding the shipped table's qwen2p5-72b-instruct).
SERVICE_MODELS["meta-llama/Llama-3.1-8B-Instruct"] = {"source": "scripted", "engine": {"kind": "scripted"}}
SERVICE_MODELS["scripted-aliased"] = {"source": "scripted", "engine": {"kind": "scripted"},
                                      "aliases": ["accounts/fireworks/models/qwen2p5-72b-instruct", "house-model"]}
# What a refusal lists beside each of those names.
SERVICE_MODEL_ALIASES = {
    "meta-llama/Llama-3.1-8B-Instruct": "accounts/fireworks/models/llama-v3p1-8b-instruct",
    "scripted-aliased": "accounts/fireworks/models/qwen2p5-72b-instruct, house-model",
}
# LoRA adapters (test_lora.py): the tiny model with two adapters, which that test builds
# under {home}/adapters before its jobs. A catalog entry of its own, so that the warm
# "tiny" replica of the other tests keeps running without LoRA; its replica starts when
# the LoRA test needs it and goes 20 s after (run_defaults' idle_seconds).
SERVICE_MODELS["tiny-lora"] = {
    "source": "{tiny}", "engine": {"engine_args": {"enforce_eager": True, "max_lora_rank": 8}},
    # tiny-gone's folder is never built: its rows fail, the engine goes on.
    "adapters": {"tiny-sql": "{home}/adapters/sql", "tiny-poet": "{home}/adapters/poet",
                 "tiny-gone": "{home}/adapters/gone"},
}


def catalog_listing() -> str:
    """What a refusal lists as the models served (jobs/model_access.py)."""
    named = []
    for name in sorted(SERVICE_MODELS):
        notes = [f"also {SERVICE_MODEL_ALIASES[name]}"] if name in SERVICE_MODEL_ALIASES else []
        adapters = sorted(SERVICE_MODELS[name].get("adapters", {}))
        notes += [f"adapters {', '.join(adapters)}"] if adapters else []
        named.append(f"{name} ({'; '.join(notes)})" if notes else name)
    return ", ".join(named)


# Shared by several jobs at once (test_engine_pool.py): a replica takes 3 rows at a time
# (1.25 x max_num_seqs 2), each job keeps 6 at the pool, so rows of different jobs
# compete for the same slots; every call recorded under {home}/pool-calls.
# "scripted-fair" has no short hang timeout (its test holds requests at a gate), and its
# rows take 1 s: a job's pipeline refills the pool far faster than the engine empties
# it, so every account has rows waiting throughout the part of the test that is
# measured (the pool can only share out rows that are there).
for _name, _replicas, _timeout, _seconds, _batches in (
    ("scripted-shared-1", 1, 3, 0.1, 6), ("scripted-shared-2", 2, 3, 0.1, 6), ("scripted-fair", 1, 600, 1.0, 6),
):
    SERVICE_MODELS[_name] = {
        "source": "scripted",
        "engine": {"kind": "scripted", "replicas": _replicas, "max_num_seqs": 2, "batch_size": 1,
                   "concurrent_batches": _batches, "request_timeout_seconds": _timeout,
                   "engine_args": {"seconds_per_request": _seconds, "invocations_dir": "{home}/pool-calls"}},
    }
# The soak's engines (test_soak.py): recording every call, with a short request
# timeout so that an armed hang is caught in seconds; one replica and two.
for _replicas in (1, 2):
    SERVICE_MODELS[f"scripted-soak-{_replicas}"] = {
        "source": "scripted",
        "engine": {"kind": "scripted", "replicas": _replicas, "batch_size": 2, "concurrent_batches": 1,
                   "request_timeout_seconds": 3,
                   "engine_args": {"seconds_per_request": 0.25, "invocations_dir": "{home}/calls"}},
    }


CLI = [sys.executable, "-m", "raybatch.cli"]


@dataclass
class Service:
    base_url: str
    storage: str
    home: str
    address: str
    metrics_port: Optional[int] = None  # Ray's Prometheus port (`raybatch up --metrics-port`)

    def key(self, account: str) -> str:
        from raybatch.api.auth import create_key
        from raybatch.store import Store

        return create_key(Store(self.storage), account)[0]

    def stop(self, how: str) -> None:
        """Stop the whole Ray cluster: "raybatch down" or "ray stop --force". This
        process leaves it first."""
        import ray

        ray.shutdown()
        if how == "raybatch down":
            raybatch_cli(self.home, "down")
        else:
            ray_cli = os.path.join(os.path.dirname(sys.executable), "ray")
            subprocess.run([ray_cli, "stop", "--force"], capture_output=True, timeout=120)

    def start(self) -> None:
        """`raybatch up` again, on the same port with the same config."""
        service_up(self.home, int(self.base_url.rsplit(":", 1)[1]), self.metrics_port)


@contextmanager
def second_app(service: Service, config: dict, name: str) -> Iterator[Service]:
    """Another Serve app of the service (its own storage and limits) on the same cluster,
    under /{name}. On leaving, its detached scheduler and engine pool are killed too:
    left alone, its warm tiny replica would hold a CPU for the rest of the session."""
    import httpx
    import ray
    from ray import serve

    from raybatch.api.app import build_app
    from raybatch.engines.pool_handle import NAMESPACE, pool_name
    from raybatch.jobs.scheduler import scheduler_name
    from raybatch.runner import ensure_ray

    ensure_ray()
    serve.run(build_app(config), name=f"raybatch-{name}", route_prefix=f"/{name}", blocking=False)
    base_url = f"{service.base_url}/{name}"
    wait_until(lambda: httpx.get(f"{base_url}/healthz").status_code == 200, timeout=120, interval=0.5)
    try:
        yield Service(base_url, config["storage"], service.home, service.address)
    finally:
        serve.delete(f"raybatch-{name}")
        for actor in (scheduler_name(config["storage"]), pool_name(config["storage"])):
            ray.kill(ray.get_actor(actor, namespace=NAMESPACE), no_restart=True)


def raybatch_cli(home: str, *args: str, check: bool = True) -> str:
    env = {**os.environ, "RAYBATCH_HOME": home}
    env.pop("RAY_ADDRESS", None)
    done = subprocess.run([*CLI, *args], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 or not check, done.stderr[-3000:]
    return done.stdout


def service_up(home: str, port: int, metrics_port: Optional[int] = None) -> dict:
    args = ["--metrics-port", str(metrics_port)] if metrics_port else []
    stdout = raybatch_cli(home, "up", "--port", str(port), "--config", os.path.join(home, "service.json"), "--num-cpus", "4", *args)
    with open(os.path.join(home, "up.json")) as up:
        state = json.load(up)
    assert stdout.strip().splitlines()[-1] == state["base_url"]
    return state


def service_config(storage: str, tiny_model: str) -> dict:
    home = os.path.dirname(storage)
    models = json.loads(json.dumps(SERVICE_MODELS).replace("{tiny}", tiny_model).replace("{home}", home))
    return {
        "storage": storage,
        "models": models,
        "progress_interval_seconds": 1,
        # tests/security: an account that may use only part of the catalog.
        "account_models": {"catalog-restricted": ["scripted"]},
        # tests/security/test_quotas.py: accounts with small quotas, so that an attack
        # meets them in a few requests; every other account has the defaults.
        "account_quotas": {
            "quota-datasets": {"max_datasets": 3},
            "quota-bytes": {"max_stored_bytes": 20_000},
            "quota-jobs": {"max_queued_jobs": 2, "max_running_jobs": 1},
            "rate-limited": {"requests_per_second": 1, "request_burst": 5},
        },
        # Scripted replicas need no CPU of their own; idle ones go after 20 s, so the
        # session's many scripted models do not pile up.
        "run_defaults": {"part_max_seconds": 1, "engine": {"idle_seconds": 20}},
        "admin_accounts": ["admin"],
    }

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

    def fired_in(self, point: str) -> int:
        """The process ID that fired the fault."""
        with open(os.path.join(self.folder, f"{point}.fired")) as record:
            return int(record.read())

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


# The writer's input: rows as the postprocess stage hands them over.

def batch(lines, shard="in.jsonl", error_every=0):
    rows = {name: [] for name in OUTPUT_SCHEMA.names}
    for line in lines:
        is_error = bool(error_every) and line % error_every == 0
        values = (shard, line, is_error, json.dumps({"line": line, "pad": "x" * 20}), 3, 2, 1)
        for name, value in zip(OUTPUT_SCHEMA.names, values):
            rows[name].append(value)
    return pa.Table.from_pydict(rows, schema=OUTPUT_SCHEMA)
