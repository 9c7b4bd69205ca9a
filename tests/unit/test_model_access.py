"""Which models a job may name (issue 10, item 1): the catalog only by default, narrowed
per account, never trust_remote_code from anywhere but a catalog entry."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from raybatch.config import ServiceConfig
from raybatch.jobs.model_access import model_refusal, models_served
from raybatch.pipeline.preprocess import prepare_requests
from raybatch.protocol import InferenceParameters

CATALOG = {"tiny": {"source": "/models/tiny"}, "big": {"source": "org/big"}}


def config(**fields) -> ServiceConfig:
    return ServiceConfig.model_validate({"storage": "/tmp/x", "models": CATALOG, **fields})


def test_only_catalog_models_are_served_by_default():
    service = config()
    assert model_refusal(service, "acme", "tiny") is None
    for outside in ("org/evil-model", "/etc", "./models/tiny", "TINY", ""):
        assert model_refusal(service, "acme", outside) == (
            f"model {outside!r} is not served here; models served: big, tiny"
        )


def test_an_empty_catalog_serves_nothing_and_says_so():
    service = ServiceConfig(storage="/tmp/x")
    assert model_refusal(service, "acme", "org/any") == (
        "model 'org/any' is not served here; no models are served (the service's model catalog is empty)"
    )


def test_the_per_account_allowlist_narrows_the_catalog():
    service = config(account_models={"intern": ["tiny"]})
    assert models_served(service, "intern") == ["tiny"] and models_served(service, "acme") == ["big", "tiny"]
    assert model_refusal(service, "intern", "tiny") is None
    assert model_refusal(service, "intern", "big") == (
        "model 'big' is not available to account 'intern'; models served to account 'intern': tiny"
    )
    assert model_refusal(service, "acme", "big") is None


def test_allow_any_model_is_an_explicit_opt_out_that_never_widens_an_allowlist():
    service = config(allow_any_model=True, account_models={"intern": ["tiny"]})
    assert model_refusal(service, "acme", "org/any-model") is None
    assert model_refusal(service, "intern", "org/any-model") == (
        "model 'org/any-model' is not served here; models served to account 'intern': tiny"
    )


def test_an_allowlist_must_name_catalog_models():
    with pytest.raises(ValidationError, match="account_models\\['intern'\\] names models not in the catalog: org/x"):
        config(account_models={"intern": ["tiny", "org/x"]})


def test_run_defaults_cannot_turn_on_trust_remote_code():
    with pytest.raises(ValidationError, match="run_defaults cannot turn on trust_remote_code"):
        config(run_defaults={"engine": {"engine_args": {"trust_remote_code": True}}})
    # A catalog entry may: it names the one model that needs it.
    config(models={"custom": {"source": "/models/custom", "engine": {"engine_args": {"trust_remote_code": True}}}})


def test_a_job_cannot_pass_engine_arguments_through_extra_body_or_a_row():
    """extraBody and row bodies reach the engine only as sampling fields: nothing there
    can become an engine argument such as trust_remote_code."""
    extra = json.dumps({"trust_remote_code": True, "model": "org/evil", "engine_args": {"trust_remote_code": True}})
    defaults = InferenceParameters(extra_body=extra).row_defaults()
    line = json.dumps({"custom_id": "a", "body": {"messages": [{"role": "user", "content": "hi"}],
                                                  "trust_remote_code": True, "model": "org/evil",
                                                  "hf_overrides": {"auto_map": {"AutoConfig": "evil.Config"}}}})
    import pyarrow as pa

    rows = prepare_requests(pa.Table.from_pydict({"shard": ["s"], "line": [1], "raw": [line.encode()]}),
                            max_line_bytes=1 << 20, max_n=4, job_defaults=defaults, duplicates=frozenset()).to_pylist()
    request = json.loads(rows[0]["request"])
    assert rows[0]["error_code"] is None
    assert set(request) <= {"custom_id", "kind", "messages", "prompt", "sampling", "max_tokens", "max_tokens_cap", "structured_output", "echo"}
    assert "trust_remote_code" not in rows[0]["request"] and "evil" not in rows[0]["request"]
