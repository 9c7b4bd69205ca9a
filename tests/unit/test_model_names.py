"""Issue 12, model names: Fireworks model IDs resolve through the shipped table, then the
catalog; catalog aliases add and override names; unknown names are refused listing what is
served."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from raybatch.config import ServiceConfig
from raybatch.jobs.model_access import model_refusal
from raybatch.jobs.model_names import FIREWORKS_MODELS, FIREWORKS_PREFIX, resolve_model
from raybatch.jobs.run_config import RunConfigBuilder

LLAMA = "accounts/fireworks/models/llama-v3p1-8b-instruct"


def config(models: dict, **fields) -> ServiceConfig:
    return ServiceConfig.model_validate({"storage": "/tmp/x", "models": models, **fields})


def test_the_shipped_table_covers_the_popular_families_with_hub_ids():
    for short in ("llama-v3p1-8b-instruct", "llama-v3p3-70b-instruct", "qwen2p5-72b-instruct", "qwen3-235b-a22b",
                  "deepseek-v3", "deepseek-r1", "mixtral-8x7b-instruct", "mistral-7b-instruct-v3", "gemma2-9b-it",
                  "gpt-oss-120b", "gpt-oss-20b"):
        assert short in FIREWORKS_MODELS
    # Fireworks IDs are lowercase and carry no account; every target is an org/repo ID.
    for short, hf_id in FIREWORKS_MODELS.items():
        assert short == short.lower() and "/" not in short
        assert hf_id.count("/") == 1, hf_id


def test_a_catalog_keyed_by_hub_id_serves_the_fireworks_name_with_no_further_config():
    service = config({"meta-llama/Llama-3.1-8B-Instruct": {"source": "/models/llama"}})
    assert resolve_model(service, LLAMA) == "meta-llama/Llama-3.1-8B-Instruct"
    assert model_refusal(service, "acme", LLAMA) is None
    run = RunConfigBuilder(service, store=None, pool_name="p").for_model(LLAMA, input="i", output="o")
    # The engine loads the catalog's source; answers carry the name the job used.
    assert run.model == "/models/llama" and run.served_model_name == LLAMA


def test_catalog_aliases_add_names_and_override_the_shipped_table():
    service = config({
        "small": {"source": "/models/small", "aliases": [LLAMA, "my-llama"]},
        "meta-llama/Llama-3.1-8B-Instruct": {"source": "/models/llama"},
    })
    assert resolve_model(service, LLAMA) == "small"  # the operator's alias wins
    assert resolve_model(service, "my-llama") == "small"
    assert resolve_model(service, "small") == "small"
    assert resolve_model(service, "accounts/fireworks/models/deepseek-v3") is None


def test_an_unknown_name_is_refused_listing_what_is_served_with_its_other_names():
    service = config({"meta-llama/Llama-3.1-8B-Instruct": {"source": "/m"}, "tiny": {"source": "/t", "aliases": ["t"]}})
    for unknown in ("accounts/fireworks/models/deepseek-v3", "accounts/fireworks/models/no-such-model", "org/x"):
        assert model_refusal(service, "acme", unknown) == (
            f"model {unknown!r} is not served here; models served: meta-llama/Llama-3.1-8B-Instruct "
            f"(also {LLAMA}), tiny (also t)"
        )


def test_the_account_allowlist_applies_to_what_a_name_resolves_to():
    service = config({"meta-llama/Llama-3.1-8B-Instruct": {"source": "/m"}, "tiny": {"source": "/t"}},
                     account_models={"intern": ["tiny"], "llama-only": ["meta-llama/Llama-3.1-8B-Instruct"]})
    assert model_refusal(service, "llama-only", LLAMA) is None
    assert model_refusal(service, "intern", LLAMA).startswith(f"model {LLAMA!r} is not available to account 'intern'")


def test_allow_any_model_loads_a_fireworks_name_as_its_hub_id_and_refuses_unknown_ones():
    service = config({}, allow_any_model=True)
    assert model_refusal(service, "acme", LLAMA) is None
    run = RunConfigBuilder(service, store=None, pool_name="p").for_model(LLAMA, input="i", output="o")
    assert run.model == "meta-llama/Llama-3.1-8B-Instruct"
    assert "is not served here" in model_refusal(service, "acme", FIREWORKS_PREFIX + "no-such-model")


@pytest.mark.parametrize("models, message", [
    ({"a": {"source": "/a", "aliases": ["b"]}, "b": {"source": "/b"}}, "model alias 'b' of 'a' is already the name of 'b'"),
    ({"a": {"source": "/a", "aliases": ["x"]}, "b": {"source": "/b", "aliases": ["x"]}}, "model alias 'x' of 'b' is already the name of 'a'"),
])
def test_an_alias_names_one_entry_only(models, message):
    with pytest.raises(ValidationError, match=message):
        config(models)
