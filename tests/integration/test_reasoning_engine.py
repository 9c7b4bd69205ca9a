"""A reasoning model end to end on the real vLLM CPU engine: the tiny model served with
vLLM's "deepseek_r1" reasoning parser. Its own engine (a reasoning parser changes every
chat row's output, so it cannot share the mixed run's). The tiny model's template does
not open <think> and the random model seldom writes </think>: as for DeepSeek-R1, text
before </think> is reasoning, so a row is mostly or wholly reasoning. The exact split of
fixed texts is tests/unit/test_tools_reasoning.py."""

from __future__ import annotations

import pytest

from raybatch.config import RunConfig
from raybatch.runner import run_job
from tests.helpers import ENGINE, InputBuilder, check_run, chat

pytestmark = pytest.mark.engine


@pytest.fixture(scope="module")
def reasoning_run(tmp_path_factory, ray_cluster, tiny_model):
    root = tmp_path_factory.mktemp("reasoning")
    b = InputBuilder()
    b.ok("in.jsonl", "think", chat("Why is the sky blue?", max_tokens=12, seed=1))
    b.ok("in.jsonl", "think-n2", chat("Think twice.", max_tokens=8, n=2, seed=2))
    b.ok("in.jsonl", "completion", {"prompt": "The quick brown fox", "max_tokens": 5}, url="/v1/completions")
    b.write(str(root / "in"))
    engine = ENGINE.model_copy(update={"engine_args": {**ENGINE.engine_args, "reasoning_parser": "deepseek_r1"}})
    summary = run_job(RunConfig(input=str(root / "in"), output=str(root / "out"), model=tiny_model, engine=engine))
    return b, root, summary


def test_reasoning_content_apart_and_reasoning_tokens_counted(reasoning_run):
    builder, root, summary = reasoning_run
    assert summary.state == "completed"
    rows = check_run(str(root / "out"), builder.expected)  # jobProgress equals the files' usage
    for custom_id in ("think", "think-n2"):
        body = rows[custom_id]["response"]["body"]
        usage = body["usage"]
        reasoning = usage["completion_tokens_details"]["reasoning_tokens"]
        assert 1 <= reasoning <= usage["completion_tokens"]
        for choice in body["choices"]:
            message = choice["message"]
            assert message["reasoning_content"]
            # All reasoning unless the model wrote </think>; then the rest is content.
            assert message["content"] is None or isinstance(message["content"], str)
        if all(c["message"]["content"] is None for c in body["choices"]):
            assert reasoning == usage["completion_tokens"]
    completion = rows["completion"]["response"]["body"]
    assert "completion_tokens_details" not in completion["usage"]  # completions are not parsed
    assert summary.status.progress.output_tokens == sum(
        r["response"]["body"]["usage"]["completion_tokens"] for r in rows.values()
    )
