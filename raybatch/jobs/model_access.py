"""Which models an account's jobs may name: the service's catalog, narrowed per account.

A model outside the catalog is a Hugging Face ID or a local path that vLLM would load on
GPU workers holding every tenant's storage credentials; loading one runs whatever that
repository makes vLLM or transformers run (several vLLM releases ran code from a
config's `auto_map` with trust_remote_code off). So only the operator's catalog is
served unless the operator opts out (`ServiceConfig.allow_any_model`). A name reaches
the catalog through `model_names.resolve_model` (catalog names, aliases, Fireworks IDs).
"""

from __future__ import annotations

from typing import Optional

from raybatch.config import ServiceConfig
from raybatch.jobs.model_names import FIREWORKS_PREFIX, hub_id, names_of, resolve_model


def models_served(config: ServiceConfig, account: str) -> list[str]:
    """The catalog names `account` may use, sorted."""
    allowed = config.account_models.get(account)
    return sorted(config.models if allowed is None else set(allowed) & set(config.models))


def model_refusal(config: ServiceConfig, account: str, model: str) -> Optional[str]:
    """Why `account` may not run `model`, or None if it may. The message lists what it
    may run instead, so that a refused user can correct the request at once."""
    served = models_served(config, account)
    resolved = resolve_model(config, model)
    if resolved in served:
        return None
    restricted = account in config.account_models
    if resolved is not None and restricted:
        return f"model {model!r} is not available to account {account!r}; {_listing(config, served, account)}"
    if config.allow_any_model and not restricted:
        # The operator opted out: any ID or path goes to vLLM as is, a Fireworks name as
        # its Hugging Face ID. A Fireworks name the table does not know loads nothing.
        if not model.startswith(FIREWORKS_PREFIX) or hub_id(model):
            return None
    return f"model {model!r} is not served here; {_listing(config, served, account if restricted else None)}"


def _listing(config: ServiceConfig, served: list[str], account: Optional[str]) -> str:
    whose = f" to account {account!r}" if account else ""
    if not served:
        return f"no models are served{whose} (the service's model catalog is empty)"
    named = []
    for name in served:
        others = names_of(config, name)
        notes = [f"also {', '.join(others)}"] if others else []
        adapters = sorted(config.models[name].adapters)  # LoRA adapters a job may name too
        notes += [f"adapters {', '.join(adapters)}"] if adapters else []
        named.append(f"{name} ({'; '.join(notes)})" if notes else name)
    return f"models served{whose}: {', '.join(named)}"
