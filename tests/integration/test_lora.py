"""Per-row LoRA adapters (issue 14, item 5) on the real vLLM CPU engine: the catalog's
"tiny-lora" (the tiny model with two random adapters built here) answers rows for its
base model and both adapters, interleaved, in one job and on one replica; a job whose
model is an adapter runs on that same replica; an unknown adapter is an error row (in a
row) or a 400 (as the job's model)."""

from __future__ import annotations

import os

import httpx
import pytest

from raybatch.tiny_adapter import build_tiny_adapter
from tests.helpers import InputBuilder, catalog_listing, chat, check_run, dataset_files_url, read_jsonl, sdk_client, wait_job

pytestmark = pytest.mark.engine

ACCOUNT = "lora"
PROMPT = "Tell me about the quick brown fox."
# Greedy and a fixed length: the same adapter gives the same text, whichever rows of
# other adapters shared its engine steps.
SAMPLING = {"temperature": 0, "max_tokens": 8, "ignore_eos": True}
MODEL_OF = {"base": None, "named-base": "tiny-lora", "sql": "tiny-sql", "poet": "tiny-poet"}


def _mixed() -> InputBuilder:
    built = InputBuilder()
    for i in range(3):  # interleaved, so that engine steps mix base and adapter rows
        for kind, model in MODEL_OF.items():
            built.ok("in.jsonl", f"{kind}-{i}", chat(PROMPT, **({"model": model} if model else {}), **SAMPLING))
    built.ok("in.jsonl", "sql-completion", {"prompt": PROMPT, "model": "tiny-sql", **SAMPLING}, url="/v1/completions")
    built.add("in.jsonl", {"custom_id": "prose", "body": chat(PROMPT, model="tiny-prose")}, "prose", "model_not_found")
    built.add("in.jsonl", {"custom_id": "gone", "body": chat(PROMPT, model="tiny-gone")}, "gone", "engine_error")
    return built


def _on_adapter() -> InputBuilder:
    built = InputBuilder()
    for custom_id, model in (("default-0", None), ("default-1", None), ("poet", "tiny-poet"), ("base", "tiny-lora")):
        built.ok("in.jsonl", custom_id, chat(PROMPT, **({"model": model} if model else {}), **SAMPLING))
    return built


def _upload(client, folder, dataset_id: str, built: InputBuilder) -> None:
    built.write(str(folder / dataset_id))
    client.datasets.create(dataset_id=dataset_id, dataset={"user_uploaded": {}})
    client.datasets.upload(dataset_id, file=("in.jsonl", (folder / dataset_id / "in.jsonl").read_bytes()))


@pytest.fixture(scope="module")
def lora_jobs(service, tiny_model, tmp_path_factory):
    adapters = os.path.join(os.path.dirname(service.storage), "adapters")  # the catalog's {home}/adapters
    build_tiny_adapter(tiny_model, os.path.join(adapters, "sql"), seed=1)
    build_tiny_adapter(tiny_model, os.path.join(adapters, "poet"), seed=2)
    client = sdk_client(service.base_url, service.key(ACCOUNT), ACCOUNT)
    folder = tmp_path_factory.mktemp("lora")
    inputs = {"mixed": _mixed(), "on-adapter": _on_adapter()}
    for dataset_id, built in inputs.items():
        _upload(client, folder, dataset_id, built)
    models = {"mixed": "tiny-lora", "on-adapter": "tiny-sql"}
    for dataset_id, model in models.items():  # both at once: they share the base's replica
        client.batch_inference_jobs.create(batch_inference_job_id=f"{dataset_id}-job", model=model,
                                           input_dataset_id=f"accounts/{ACCOUNT}/datasets/{dataset_id}")
    finished = {dataset_id: wait_job(client, f"{dataset_id}-job", timeout=600)[0] for dataset_id in models}
    engines = httpx.get(f"{service.base_url}/v1/admin/engines",
                        headers={"Authorization": f"Bearer {service.key('admin')}"}, timeout=30).json()["replicas"]
    results = {}
    for dataset_id, job in finished.items():
        assert job.state == "JOB_STATE_COMPLETED", job.status
        output = dataset_files_url(service.storage, ACCOUNT, job.output_dataset_id)
        check_run(output, inputs[dataset_id].expected)
        results[dataset_id] = {row["custom_id"]: row for row in read_jsonl(f"{output}/results.jsonl")}
        results[f"{dataset_id}-errors"] = read_jsonl(f"{output}/errors.jsonl")
    return results, engines


def _text(row: dict) -> str:
    choice = row["response"]["body"]["choices"][0]
    return choice.get("message", {}).get("content") if "message" in choice else choice["text"]


def test_rows_of_the_base_and_of_each_adapter_are_answered_by_their_own_weights(lora_jobs):
    results = lora_jobs[0]["mixed"]
    texts = {kind: {_text(results[f"{kind}-{i}"]) for i in range(3)} for kind in MODEL_OF}
    # Each kind answers alike every time, and the three models answer differently: a
    # base row never got an adapter's weights from a row it shared a step with.
    assert all(len(found) == 1 for found in texts.values()), texts
    assert texts["base"] == texts["named-base"]
    assert len({*texts["base"], *texts["sql"], *texts["poet"]}) == 3, texts
    # The output names what answered: the adapter, as OpenAI names a fine-tune.
    for i in range(3):
        assert [results[f"{kind}-{i}"]["response"]["body"]["model"] for kind in MODEL_OF] == [
            "tiny-lora", "tiny-lora", "tiny-sql", "tiny-poet"]
    completion = results["sql-completion"]["response"]["body"]
    assert completion["object"] == "text_completion" and completion["model"] == "tiny-sql"


def test_an_unknown_adapter_in_a_row_is_an_error_row_saying_what_is_served(lora_jobs):
    row = {r["custom_id"]: r for r in lora_jobs[0]["mixed-errors"]}["prose"]
    assert row["response"] is None
    assert row["error"] == {"code": "model_not_found", "line": 14, "file": "in.jsonl", "message":
                            "model 'tiny-prose' is neither the job's base model 'tiny-lora' nor one of its "
                            "adapters (tiny-gone, tiny-poet, tiny-sql)"}


def test_an_adapter_whose_files_are_missing_fails_its_rows_not_the_engine(lora_jobs, service):
    """vLLM would load it inside its engine core and die (engines/lora.py); the other
    rows of the job were answered by the same engine (the first test)."""
    row = {r["custom_id"]: r for r in lora_jobs[0]["mixed-errors"]}["gone"]
    folder = os.path.join(os.path.dirname(service.storage), "adapters", "gone")
    assert row["response"] is None
    assert row["error"] == {"code": "engine_error", "line": 15, "file": "in.jsonl", "message":
                            f"LoRA adapter 'tiny-gone' cannot be loaded: no adapter_config.json in {folder!r} on this node"}


def test_a_job_on_an_adapter_uses_it_unless_a_row_names_another_model(lora_jobs):
    mixed, on_adapter = lora_jobs[0]["mixed"], lora_jobs[0]["on-adapter"]
    expected = {"default-0": "sql-0", "default-1": "sql-0", "poet": "poet-0", "base": "base-0"}
    for custom_id, same_as in expected.items():
        assert _text(on_adapter[custom_id]) == _text(mixed[same_as]), custom_id
        assert on_adapter[custom_id]["response"]["body"]["model"] == mixed[same_as]["response"]["body"]["model"]


def test_every_adapter_runs_on_the_base_models_one_replica(lora_jobs):
    replicas = [r for r in lora_jobs[1] if "tiny-lora" in r["model"]]
    assert len(replicas) == 1, replicas  # both jobs' rows, base and adapters, on one replica
    assert replicas[0]["model"] == "tiny-lora"  # the job on an adapter serves under its base's name


def test_an_unknown_adapter_as_the_jobs_model_is_refused_at_create(service):
    key = service.key(ACCOUNT)
    reply = httpx.post(f"{service.base_url}/v1/accounts/{ACCOUNT}/batchInferenceJobs", params={"batchInferenceJobId": "prose"},
                       headers={"Authorization": f"Bearer {key}"}, timeout=30,
                       json={"model": "tiny-prose", "inputDatasetId": f"accounts/{ACCOUNT}/datasets/mixed"})
    assert reply.status_code == 400
    message = f"model 'tiny-prose' is not served here; models served: {catalog_listing()}"
    assert reply.json() == {"code": 3, "message": message, "details": [],
                            "error": {"code": 400, "status": "INVALID_ARGUMENT", "message": message}}
