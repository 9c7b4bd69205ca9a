"""Model names a job may use: catalog names, catalog aliases, and Fireworks' model IDs.

Scripts written for Fireworks name models as `accounts/fireworks/models/<id>`. The
shipped table below maps those IDs to the Hugging Face repositories they are, so that a
catalog keyed by Hugging Face ID (its source a local copy) serves the Fireworks name with
no further configuration. An operator adds or overrides names with a catalog entry's
`aliases`. Resolution never widens what is served: every name ends at a catalog entry
(or, with `allow_any_model`, at a Hugging Face ID handed to vLLM).
"""

from __future__ import annotations

from typing import Optional

from raybatch.adapters import adapter_owner
from raybatch.config import ServiceConfig

FIREWORKS_PREFIX = "accounts/fireworks/models/"

# Fireworks model ID → Hugging Face ID, for the families users batch most. IDs from
# Fireworks' model library; each is the instruct/chat checkpoint Fireworks serves.
FIREWORKS_MODELS: dict[str, str] = {
    # Llama 3.x and 4
    "llama-v3-8b-instruct": "meta-llama/Meta-Llama-3-8B-Instruct",
    "llama-v3-70b-instruct": "meta-llama/Meta-Llama-3-70B-Instruct",
    "llama-v3p1-8b-instruct": "meta-llama/Llama-3.1-8B-Instruct",
    "llama-v3p1-70b-instruct": "meta-llama/Llama-3.1-70B-Instruct",
    "llama-v3p1-405b-instruct": "meta-llama/Llama-3.1-405B-Instruct",
    "llama-v3p2-1b-instruct": "meta-llama/Llama-3.2-1B-Instruct",
    "llama-v3p2-3b-instruct": "meta-llama/Llama-3.2-3B-Instruct",
    "llama-v3p3-70b-instruct": "meta-llama/Llama-3.3-70B-Instruct",
    "llama4-scout-instruct-basic": "meta-llama/Llama-4-Scout-17B-16E-Instruct",
    "llama4-maverick-instruct-basic": "meta-llama/Llama-4-Maverick-17B-128E-Instruct",
    # Qwen 2.5 and 3
    "qwen2p5-7b-instruct": "Qwen/Qwen2.5-7B-Instruct",
    "qwen2p5-32b-instruct": "Qwen/Qwen2.5-32B-Instruct",
    "qwen2p5-72b-instruct": "Qwen/Qwen2.5-72B-Instruct",
    "qwen2p5-coder-32b-instruct": "Qwen/Qwen2.5-Coder-32B-Instruct",
    "qwq-32b": "Qwen/QwQ-32B",
    "qwen3-8b": "Qwen/Qwen3-8B",
    "qwen3-14b": "Qwen/Qwen3-14B",
    "qwen3-32b": "Qwen/Qwen3-32B",
    "qwen3-30b-a3b": "Qwen/Qwen3-30B-A3B",
    "qwen3-235b-a22b": "Qwen/Qwen3-235B-A22B",
    "qwen3-30b-a3b-instruct-2507": "Qwen/Qwen3-30B-A3B-Instruct-2507",
    "qwen3-235b-a22b-instruct-2507": "Qwen/Qwen3-235B-A22B-Instruct-2507",
    "qwen3-235b-a22b-thinking-2507": "Qwen/Qwen3-235B-A22B-Thinking-2507",
    "qwen3-coder-480b-a35b-instruct": "Qwen/Qwen3-Coder-480B-A35B-Instruct",
    # DeepSeek
    "deepseek-v3": "deepseek-ai/DeepSeek-V3",
    "deepseek-v3-0324": "deepseek-ai/DeepSeek-V3-0324",
    "deepseek-v3p1": "deepseek-ai/DeepSeek-V3.1",
    "deepseek-v3p1-terminus": "deepseek-ai/DeepSeek-V3.1-Terminus",
    "deepseek-r1": "deepseek-ai/DeepSeek-R1",
    "deepseek-r1-0528": "deepseek-ai/DeepSeek-R1-0528",
    "deepseek-r1-distill-llama-70b": "deepseek-ai/DeepSeek-R1-Distill-Llama-70B",
    "deepseek-r1-distill-qwen-32b": "deepseek-ai/DeepSeek-R1-Distill-Qwen-32B",
    # Mistral and Mixtral
    "mistral-7b-instruct-v3": "mistralai/Mistral-7B-Instruct-v0.3",
    "mistral-small-24b-instruct-2501": "mistralai/Mistral-Small-24B-Instruct-2501",
    "mixtral-8x7b-instruct": "mistralai/Mixtral-8x7B-Instruct-v0.1",
    "mixtral-8x22b-instruct": "mistralai/Mixtral-8x22B-Instruct-v0.1",
    # Gemma
    "gemma2-9b-it": "google/gemma-2-9b-it",
    "gemma-3-27b-it": "google/gemma-3-27b-it",
    # gpt-oss
    "gpt-oss-20b": "openai/gpt-oss-20b",
    "gpt-oss-120b": "openai/gpt-oss-120b",
    # Others in Fireworks' library
    "kimi-k2-instruct": "moonshotai/Kimi-K2-Instruct",
    "kimi-k2-instruct-0905": "moonshotai/Kimi-K2-Instruct-0905",
    "glm-4p5": "zai-org/GLM-4.5",
    "glm-4p5-air": "zai-org/GLM-4.5-Air",
}


def aliases(config: ServiceConfig) -> dict[str, str]:
    """Every name that stands for another: the shipped Fireworks names (→ Hugging Face
    ID), then the catalog entries' own `aliases` (→ the entry's name), which override."""
    table = {FIREWORKS_PREFIX + short: hf_id for short, hf_id in FIREWORKS_MODELS.items()}
    for name, entry in config.models.items():
        table.update({alias: name for alias in entry.aliases})
    return table


def resolve_model(config: ServiceConfig, name: str) -> Optional[str]:
    """The catalog name a job's `model` stands for, or None if it names no catalog entry.
    A catalog name is itself; a LoRA adapter's name is the entry that lists it; an alias
    is followed once (a catalog alias may point at a Hugging Face ID that the shipped
    table also knows: no chains beyond that)."""
    if name in config.models:
        return name
    owner = adapter_owner(config, name)  # a LoRA adapter runs on its base model's entry
    if owner is not None:
        return owner
    target = aliases(config).get(name)
    return target if target in config.models else None


def hub_id(name: str) -> Optional[str]:
    """The Hugging Face ID of a Fireworks model name, for `allow_any_model` services."""
    if name.startswith(FIREWORKS_PREFIX):
        return FIREWORKS_MODELS.get(name[len(FIREWORKS_PREFIX):])
    return None


def names_of(config: ServiceConfig, catalog_name: str) -> list[str]:
    """The other names that resolve to `catalog_name`, sorted (for refusal messages)."""
    return sorted(alias for alias, target in aliases(config).items()
                  if target == catalog_name and resolve_model(config, alias) == catalog_name)
