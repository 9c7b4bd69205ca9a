"""Embeddings end to end on the real vLLM CPU engine: the tiny Llama run as a pooling
model (tests.helpers.EMBED_ENGINE, the service's `tiny-embed`). One replica serves the
module: `raybatch run` joins the service's pool with the catalog entry's engine, and the
job through the Fireworks SDK finds the same replica warm.

Every line is accounted for exactly once; each body is OpenAI's embeddings response
(openai's own `CreateEmbeddingResponse` is the oracle); base64 decodes to the float list;
usage and jobProgress count the tokens each input has."""

from __future__ import annotations

import base64
import json

import numpy as np
import pytest

from raybatch.config import RunConfig
from raybatch.engines.pool_handle import pool_name
from raybatch.runner import run_job
from tests.helpers import (
    EMBED_ENGINE,
    InputBuilder,
    chat,
    check_run,
    dataset_files_url,
    read_jsonl,
    sdk_client,
    wait_job,
)

pytestmark = pytest.mark.engine

URL = "/v1/embeddings"
HIDDEN_SIZE = 256  # the tiny model's (raybatch/tiny_model.py)
TEXTS = ["the quick brown fox", "hello world", "json object schema", "the lazy dog"]


def _input() -> InputBuilder:
    built = InputBuilder()
    f = "in.jsonl"

    def emb(custom_id, body, error=None):
        built.add(f, {"custom_id": custom_id, "url": URL, "body": body}, custom_id, error)

    emb("one", {"input": TEXTS[0]})
    emb("one-base64", {"input": TEXTS[0], "encoding_format": "base64"})
    emb("many", {"input": TEXTS})
    emb("many-base64", {"input": TEXTS, "encoding_format": "base64", "model": "ignored", "user": "u-1"})
    emb("ids", {"input": [5, 6, 7, 8]})
    emb("ids-many", {"input": [[5, 6], [7, 8, 9]]})
    emb("dims", {"input": TEXTS[1], "dimensions": 64})
    emb("dims-not-matryoshka", {"input": TEXTS[1], "dimensions": 100}, "dimensions_not_supported")
    emb("dims-too-large", {"input": TEXTS[1], "dimensions": 1000}, "dimensions_not_supported")
    emb("empty", {"input": ""}, "invalid_request")
    emb("bad-format", {"input": "x", "encoding_format": "int8"}, "invalid_request")
    emb("bad-ids", {"input": [5, 99_999]}, "invalid_request")
    emb("too-long", {"input": ["short", "word " * 700]}, "context_length_exceeded")
    # An embedding model refuses chat and completion rows.
    built.add(f, {"custom_id": "chat", "body": chat("hi")}, "chat", "unsupported_url_for_model")
    built.add(f, {"custom_id": "completion", "url": "/v1/completions", "body": {"prompt": "hi"}},
              "completion", "unsupported_url_for_model")
    return built


def _tokens(tiny_model: str, item) -> int:
    from transformers import AutoTokenizer

    return len(item) if isinstance(item, list) else len(AutoTokenizer.from_pretrained(tiny_model).encode(item))


@pytest.fixture(scope="module")
def embed_run(tmp_path_factory, ray_cluster, service, tiny_model):
    root = tmp_path_factory.mktemp("embed-run")
    built = _input()
    built.write(str(root / "in"))
    config = RunConfig(
        input=str(root / "in"),
        output=str(root / "out"),
        model=tiny_model,
        served_model_name="tiny-embed",
        engine_pool=pool_name(service.storage),
        part_max_rows=5,
        engine=EMBED_ENGINE,
    )
    summary = run_job(config)
    return built, str(root / "out"), summary


def test_every_line_accounted_for_exactly_once(embed_run):
    built, out, summary = embed_run
    assert summary.state == "completed"
    check_run(out, built.expected)


def test_bodies_are_openais_embeddings_response(embed_run, tiny_model):
    from openai.types import CreateEmbeddingResponse

    results = {row["custom_id"]: row for row in read_jsonl(f"{embed_run[1]}/results.jsonl")}
    inputs = {e.custom_id: json.loads(line)["body"].get("input")
              for e, line in zip(embed_run[0].expected, embed_run[0].shards["in.jsonl"])}
    assert len(results) == 7
    for custom_id, row in results.items():
        assert row["error"] is None and row["response"]["status_code"] == 200
        body = row["response"]["body"]
        # The SDK's type holds floats (it decodes base64 itself): check with them.
        floats = {**body, "data": [{**d, "embedding": v.tolist()} for d, v in zip(body["data"], _vectors(row))]}
        parsed = CreateEmbeddingResponse.model_validate(floats)
        assert parsed.model_dump(exclude_unset=True) == floats, "a field OpenAI's response does not have"
        assert set(body) == {"object", "data", "model", "usage"} and body["object"] == "list"
        assert body["model"] == "tiny-embed"
        items = inputs[custom_id]
        items = [items] if isinstance(items, str) or isinstance(items[0], int) else items
        assert [d["index"] for d in body["data"]] == list(range(len(items)))
        assert all(set(d) == {"object", "index", "embedding"} and d["object"] == "embedding" for d in body["data"])
        tokens = sum(_tokens(tiny_model, item) for item in items)
        assert body["usage"] == {"prompt_tokens": tokens, "total_tokens": tokens}


def _vectors(row) -> list[np.ndarray]:
    out = []
    for item in row["response"]["body"]["data"]:
        value = item["embedding"]
        out.append(np.frombuffer(base64.b64decode(value), dtype="<f4") if isinstance(value, str) else np.array(value))
    return out


def test_base64_decodes_to_the_same_float_list(embed_run):
    results = {row["custom_id"]: row for row in read_jsonl(f"{embed_run[1]}/results.jsonl")}
    for plain, encoded in (("one", "one-base64"), ("many", "many-base64")):
        assert all(isinstance(d["embedding"], list) for d in results[plain]["response"]["body"]["data"])
        assert all(isinstance(d["embedding"], str) for d in results[encoded]["response"]["body"]["data"])
        for a, b in zip(_vectors(results[plain]), _vectors(results[encoded]), strict=True):
            # The same input embedded twice, batched with different neighbours.
            np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4)
    # Each vector is the model's hidden size and normalized; `dimensions` cuts and renormalizes.
    for vector in _vectors(results["many"]) + _vectors(results["ids"]):
        assert vector.shape == (HIDDEN_SIZE,)
        assert abs(np.linalg.norm(vector) - 1) < 1e-3
    (cut,) = _vectors(results["dims"])
    assert cut.shape == (64,) and abs(np.linalg.norm(cut) - 1) < 1e-3
    # Different texts give different vectors; an item's place in a list does not matter.
    many = _vectors(results["many"])
    assert not np.allclose(many[0], many[1])
    np.testing.assert_allclose(many[0], _vectors(results["one"])[0], rtol=1e-3, atol=1e-4)


def test_error_rows_say_what_is_wrong(embed_run):
    errors = {row["custom_id"]: row["error"] for row in read_jsonl(f"{embed_run[1]}/errors.jsonl")}
    assert "Matryoshka dimensions [32, 64, 128, 256], got 100" in errors["dims-not-matryoshka"]["message"]
    assert "got 1000" in errors["dims-too-large"]["message"]
    assert "embedding model" in errors["chat"]["message"] and URL in errors["chat"]["message"]
    assert "maximum context length is 512" in errors["too-long"]["message"]
    assert errors["bad-ids"]["message"].startswith("input token ids must be in [0, ")


def test_a_job_through_the_fireworks_sdk(service, embed_run, tmp_path):
    account = "embed"
    client = sdk_client(service.base_url, service.key(account), account)
    built = _input()
    built.write(str(tmp_path))
    client.datasets.create(dataset_id="embed-in", dataset={"user_uploaded": {}})
    client.datasets.upload("embed-in", file=("in.jsonl", (tmp_path / "in.jsonl").read_bytes()))
    client.batch_inference_jobs.create(
        batch_inference_job_id="embed-job", model="tiny-embed",
        input_dataset_id=f"accounts/{account}/datasets/embed-in",
    )
    finished, _ = wait_job(client, "embed-job", timeout=600)
    assert finished.state == "JOB_STATE_COMPLETED", finished.status
    output = dataset_files_url(service.storage, account, finished.output_dataset_id)
    progress = finished.job_progress
    check_run(output, built.expected, progress=progress.to_dict())
    results = read_jsonl(f"{output}/results.jsonl")
    assert int(progress.input_tokens) == sum(r["response"]["body"]["usage"]["prompt_tokens"] for r in results) > 0
    assert int(progress.output_tokens or 0) == 0
    # The same rows as `raybatch run`'s, the same usage.
    usage = {r["custom_id"]: r["response"]["body"]["usage"] for r in read_jsonl(f"{embed_run[1]}/results.jsonl")}
    assert {r["custom_id"]: r["response"]["body"]["usage"] for r in results} == usage
