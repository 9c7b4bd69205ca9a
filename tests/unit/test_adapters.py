"""Per-row LoRA adapters (issue 14, item 5), without an engine: the catalog's adapters,
what a job on an adapter runs, how each row is routed, what its output names, and what
the replica hands vLLM. The real engine's side is tests/integration/test_lora.py."""

from __future__ import annotations

import json

import pyarrow as pa
import pytest
from pydantic import ValidationError

from raybatch.adapters import AdapterRouting
from raybatch.config import RunConfig, ServiceConfig
from raybatch.engines.lora import AdapterRequests
from raybatch.exceptions import RowError
from raybatch.jobs.model_access import model_refusal
from raybatch.jobs.model_names import resolve_model
from raybatch.jobs.run_config import RunConfigBuilder
from raybatch.pipeline.postprocess import finish_rows
from raybatch.pipeline.preprocess import prepare_requests
from raybatch.pipeline.rows import ENGINE_SCHEMA, Choice, EngineRequest, EngineResult
from raybatch.precision import EnginePlan
from raybatch.runner import job_pool_model

CATALOG = {
    "base": {"source": "/models/base", "aliases": ["house-base"],
             "adapters": {"sql": "/adapters/sql", "poet": "/adapters/poet"}},
    "plain": {"source": "/models/plain"},
}


def service(**fields) -> ServiceConfig:
    return ServiceConfig.model_validate({"storage": "/tmp/x", "models": CATALOG, **fields})


def run_for(name: str) -> RunConfig:
    return RunConfigBuilder(service(), store=None, pool_name="p").for_model(name, input="i", output="o")


def test_an_adapter_resolves_to_its_base_model_and_obeys_the_base_models_allowlist():
    config = service(account_models={"intern": ["plain"]})
    assert resolve_model(config, "sql") == "base"
    assert model_refusal(config, "acme", "poet") is None
    assert model_refusal(config, "intern", "poet") == (
        "model 'poet' is not available to account 'intern'; models served to account 'intern': plain"
    )


def test_an_unknown_adapter_as_the_jobs_model_is_refused_listing_what_is_served():
    assert model_refusal(service(), "acme", "prose") == (
        "model 'prose' is not served here; models served: base (also house-base; adapters poet, sql), plain"
    )


@pytest.mark.parametrize("models, message", [
    ({"a": {"source": "x", "adapters": {"b": "/p"}}, "b": {"source": "y"}}, "adapter 'b' of 'a' is already the name of 'b'"),
    ({"a": {"source": "x", "adapters": {"k": "/p"}}, "b": {"source": "y", "adapters": {"k": "/q"}}},
     "adapter 'k' of 'b' is already the name of 'a'"),
    ({"a": {"source": "x", "aliases": ["k"]}, "b": {"source": "y", "adapters": {"k": "/q"}}},
     "adapter 'k' of 'b' is already the name of 'a'"),
])
def test_adapter_names_are_unique_across_the_catalog(models, message):
    with pytest.raises(ValidationError, match=message):
        ServiceConfig.model_validate({"storage": "/tmp/x", "models": models})


def test_a_job_on_the_base_model_routes_rows_to_every_adapter():
    run = run_for("house-base")
    assert run.model == "/models/base" and run.served_model_name == "house-base"
    assert run.lora == AdapterRouting(adapters={"sql": "/adapters/sql", "poet": "/adapters/poet"},
                                      default=None, base_names=["base", "house-base"])
    assert run_for("plain").lora is None


def test_a_job_on_an_adapter_runs_on_the_base_models_replicas():
    on_adapter, on_base = run_for("sql"), run_for("base")
    assert on_adapter.model == "/models/base" and on_adapter.served_model_name == "base"
    assert on_adapter.lora.default == "sql"
    plan = EnginePlan(device="gpu", replicas=1, gpus_per_replica=1, engine_args={"max_model_len": 64})
    pooled = job_pool_model(on_adapter, plan, fixed=False)
    # One pool key for the base model whatever adapter a job names: they share replicas.
    assert pooled.spec.key == job_pool_model(on_base, plan, fixed=False).spec.key
    assert pooled.spec.engine_args == {"enable_lora": True, "max_loras": 2, "max_model_len": 64}
    assert job_pool_model(run_for("plain"), plan, fixed=False).spec.engine_args == {"max_model_len": 64}
    # The operator's own engine_args win...
    plan.engine_args.update(max_loras=1, max_lora_rank=64)
    assert job_pool_model(on_adapter, plan, fixed=False).spec.engine_args == {
        "enable_lora": True, "max_loras": 1, "max_lora_rank": 64, "max_model_len": 64}
    # ...but on CPU there is always a slot more than adapters (adapters.lora_engine_args).
    cpu = plan.model_copy(update={"device": "cpu", "gpus_per_replica": 0})
    assert job_pool_model(on_adapter, cpu, fixed=False).spec.engine_args["max_loras"] == 3


def prepared(run: RunConfig, bodies: dict[str, dict]) -> dict[str, dict]:
    lines = [json.dumps({"custom_id": cid, "body": body, "url": "/v1/completions" if "prompt" in body else "/v1/chat/completions"}).encode()
             for cid, body in bodies.items()]
    table = pa.Table.from_pydict({"shard": ["s"] * len(lines), "line": list(range(1, len(lines) + 1)), "raw": lines})
    rows = prepare_requests(table, max_line_bytes=1 << 20, max_n=4, job_defaults={}, duplicates=frozenset(),
                            lora=run.lora.model_dump() if run.lora else None).to_pylist()
    return {row["custom_id"]: row for row in rows}


def chat(**fields) -> dict:
    return {"messages": [{"role": "user", "content": "hi"}], **fields}


def adapter_of(row: dict):
    request = json.loads(row["request"])
    return request.get("adapter"), request.get("adapter_path")


def test_each_row_is_routed_by_its_body_model():
    rows = prepared(run_for("base"), {
        "none": chat(), "base": chat(model="base"), "alias": chat(model="house-base"),
        "sql": chat(model="sql"), "poet": chat(model="poet"), "prose": chat(model="prose"),
        "completion": {"prompt": "x", "model": "poet"},
    })
    assert adapter_of(rows["none"]) == adapter_of(rows["base"]) == adapter_of(rows["alias"]) == (None, None)
    assert adapter_of(rows["sql"]) == ("sql", "/adapters/sql")
    assert adapter_of(rows["poet"]) == adapter_of(rows["completion"]) == ("poet", "/adapters/poet")
    assert rows["prose"]["request"] is None and rows["prose"]["custom_id"] == "prose"
    assert rows["prose"]["error_code"] == "model_not_found"
    assert rows["prose"]["error_message"] == (
        "model 'prose' is neither the job's base model 'base' nor one of its adapters (poet, sql)"
    )


def test_on_an_adapter_job_rows_use_its_adapter_unless_they_name_another():
    rows = prepared(run_for("sql"), {"none": chat(), "poet": chat(model="poet"), "base": chat(model="base")})
    assert adapter_of(rows["none"]) == ("sql", "/adapters/sql")
    assert adapter_of(rows["poet"]) == ("poet", "/adapters/poet")
    assert adapter_of(rows["base"]) == (None, None)


def test_a_model_without_adapters_ignores_body_model_as_before():
    rows = prepared(run_for("plain"), {"other": chat(model="gpt-4o-mini")})
    assert rows["other"]["error_code"] is None and adapter_of(rows["other"]) == (None, None)


def test_an_adapter_rows_output_names_its_adapter():
    result = EngineResult(prompt_tokens=3, cached_tokens=0, choices=[Choice(text="x", finish_reason="stop", completion_tokens=1)])
    table = pa.Table.from_pylist([
        {"shard": "s", "line": 1, "custom_id": "a", "kind": "chat", "result": result.model_copy(update={"adapter": "sql"}).model_dump_json()},
        {"shard": "s", "line": 2, "custom_id": "b", "kind": "completion", "result": result.model_dump_json()},
    ], schema=ENGINE_SCHEMA)
    out = [json.loads(line) for line in finish_rows(table, model="base").column("output").to_pylist()]
    assert [row["response"]["body"]["model"] for row in out] == ["sql", "base"]


def test_the_replica_gives_each_adapter_one_vllm_id_and_refuses_a_missing_folder(tmp_path):
    for name in ("sql", "poet"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "adapter_config.json").write_text("{}")
    adapters = AdapterRequests()

    def request(name, path):
        return adapters.request(EngineRequest(custom_id="c", kind="chat", sampling={}, adapter=name, adapter_path=path))

    sql = request("sql", str(tmp_path / "sql"))
    poet = request("poet", f"file://{tmp_path / 'poet'}")
    again = request("sql", str(tmp_path / "sql"))
    assert (sql.lora_name, sql.lora_int_id, sql.lora_path) == ("sql", 1, str(tmp_path / "sql"))
    assert (poet.lora_int_id, poet.lora_path) == (2, str(tmp_path / "poet"))
    assert again.lora_int_id == 1
    assert adapters.request(EngineRequest(custom_id="c", kind="chat", sampling={})) is None
    with pytest.raises(RowError) as refused:
        request("gone", str(tmp_path / "gone"))
    assert refused.value.code == "engine_error"
    assert refused.value.message == (
        f"LoRA adapter 'gone' cannot be loaded: no adapter_config.json in {str(tmp_path / 'gone')!r} on this node"
    )


def test_a_job_on_an_adapter_without_its_files_fails_before_any_engine(tmp_path):
    from raybatch.exceptions import ConfigError
    from raybatch.jobs.run_config import check_adapter_source

    (tmp_path / "sql").mkdir()
    (tmp_path / "sql" / "adapter_config.json").write_text("{}")
    models = {"base": {"source": "/models/base", "adapters": {"sql": str(tmp_path / "sql"), "gone": str(tmp_path / "gone")}}}
    builder = RunConfigBuilder(ServiceConfig(storage="/tmp/x", models=models), store=None, pool_name="p")
    check_adapter_source(builder.for_model("sql", input="i", output="o"))
    check_adapter_source(builder.for_model("base", input="i", output="o"))  # its broken adapter fails only its rows
    with pytest.raises(ConfigError) as failed:
        check_adapter_source(builder.for_model("gone", input="i", output="o"))
    assert str(failed.value) == f"LoRA adapter 'gone' ({str(tmp_path / 'gone')!r}): no adapter_config.json there"


def test_the_replica_refuses_an_adapter_vllm_would_fail_to_load_in_its_engine_core(tmp_path):
    """vLLM 0.32 loads an adapter inside its engine core, where a failed load kills the
    engine: its own checks run first, and such an adapter fails only its rows."""
    from vllm.config.lora import LoRAConfig

    from raybatch.tiny_model import build_tiny_model
    from raybatch.tiny_adapter import build_tiny_adapter

    base = build_tiny_model(tmp_path / "base")
    build_tiny_adapter(base, tmp_path / "rank-8", rank=8)
    build_tiny_adapter(base, tmp_path / "rank-32", rank=32)
    adapters = AdapterRequests(LoRAConfig(max_lora_rank=16))

    def request(name):
        return adapters.request(EngineRequest(custom_id="c", kind="chat", sampling={}, adapter=name,
                                              adapter_path=str(tmp_path / name)))

    assert request("rank-8").lora_int_id == 1
    with pytest.raises(RowError) as refused:
        request("rank-32")
    assert refused.value.code == "engine_error"
    assert refused.value.message == "LoRA adapter 'rank-32' cannot be loaded: LoRA rank 32 is greater than max_lora_rank 16."
