"""Per-row LoRA adapters: which adapter of the job's base model answers each row.

A catalog entry lists its adapters (`ModelEntry.adapters`, name → path). A job on that
entry, or on one of its adapters, gets an `AdapterRouting`: the adapters rows may name,
the job's own adapter if its `model` is one, and the names that mean the base model.
Each row's `body.model` then picks its adapter (`route_row`); the replica loads it on
first use (vLLM's LoRA support). All of them share the base model's replicas: the pool
keys replicas by the base model's source and engine arguments, never by adapter.

A model without adapters keeps the old rule: `body.model` is ignored, as files written
for other services often carry a model name of their own. Once a model has adapters the
name chooses what answers a row, so a name that is neither the base nor one of its
adapters is an error row (model_not_found), not a silent answer by the base model.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Optional

from pydantic import BaseModel, ConfigDict, Field

from raybatch.exceptions import RowError
from raybatch.protocol import ErrorCode

if TYPE_CHECKING:
    from raybatch.config import ServiceConfig

# vLLM keeps this many adapters in GPU memory at once (each a slot of max_lora_rank);
# rows for more adapters than that in one engine step wait for a slot. vLLM's own
# default is 1, which would run rows of different adapters one adapter at a time.
DEFAULT_MAX_LORAS = 4


class AdapterRouting(BaseModel):
    """What a job's pipeline needs to route its rows to adapters (`RunConfig.lora`)."""

    model_config = ConfigDict(extra="forbid")

    adapters: dict[str, str] = Field(description="The base model's adapters: name → path "
                                     "(a local folder every node can read, or a Hugging "
                                     "Face ID) holding adapter_config.json and the weights.")
    default: Optional[str] = Field(None, description="The adapter of a row that names "
                                   "none: the job's model, when that is an adapter. None: "
                                   "the base model.")
    base_names: list[str] = Field(default_factory=list, description="Names a row may give "
                                  "to mean the base model (its catalog name and aliases).")


def route_row(routing: Optional[AdapterRouting], model: Optional[str]) -> Optional[str]:
    """The adapter that answers a row whose `body.model` is `model`; None: the base
    model. Raises RowError(model_not_found) for a name this job does not serve."""
    if routing is None:
        return None  # a model without adapters: body.model is ignored
    if model is None:
        return routing.default
    if model in routing.adapters:
        return model
    if model in routing.base_names:
        return None
    served = ", ".join(sorted(routing.adapters)) or "none"
    base = routing.base_names[0] if routing.base_names else "the job's model"
    raise RowError(
        ErrorCode.MODEL_NOT_FOUND,
        f"model {model!r} is neither the job's base model {base!r} nor one of its adapters ({served})",
    )


def lora_engine_args(routing: Optional[AdapterRouting], engine_args: dict[str, Any], device: str) -> dict[str, Any]:
    """`engine_args` with what a base model with adapters needs added; the operator's
    own values win (e.g. `max_lora_rank` above vLLM's default of 16), except below.

    On CPU, one LoRA slot more than there are adapters, always: vLLM's CPU LoRA kernels
    (vllm/lora/ops/torch_ops, 0.32) index the adapter weights with a row's slot, and a
    row without adapter has slot -1, which Python indexing turns into the last slot. In
    an engine step that mixes base rows and adapter rows, base rows were answered by
    whatever adapter sat in the last slot. vLLM fills slots first-free-first and evicts
    only when every slot is taken, so with more slots than adapters no adapter ever
    reaches the last one: it keeps its zeros (vLLM's warm-up adapters are zeros too) and
    slot -1 adds nothing. GPU kernels skip slot -1. The upstream fix is open as
    vllm-project/vllm#48421; drop the extra slot once the CPU build has it."""
    if routing is None or not routing.adapters:
        return engine_args
    args = {"enable_lora": True, "max_loras": min(len(routing.adapters), DEFAULT_MAX_LORAS), **engine_args}
    if device == "cpu":
        args["max_loras"] = max(args["max_loras"], len(routing.adapters) + 1)
    return args


def adapter_files_missing(path: str) -> bool:
    """Whether `path` is a local folder without an adapter (no adapter_config.json). A
    Hugging Face ID is left to vLLM to fetch."""
    folder = os.path.expanduser(path.removeprefix("file://"))
    local = path.startswith(("/", ".", "~", "file://")) or os.path.exists(folder)
    return not path or (local and not os.path.isfile(os.path.join(folder, "adapter_config.json")))


# --------------------------------------------------------------------------- the catalog


def adapter_owner(config: "ServiceConfig", name: str) -> Optional[str]:
    """The catalog name of the entry that lists adapter `name`, or None."""
    for entry_name, entry in config.models.items():
        if name in entry.adapters:
            return entry_name
    return None


def routing_for(config: "ServiceConfig", catalog_name: str, job_model: str) -> Optional[AdapterRouting]:
    """The routing of a job whose `model` is `job_model`, served by catalog entry
    `catalog_name`; None for an entry without adapters."""
    from raybatch.jobs.model_names import names_of

    entry = config.models[catalog_name]
    if not entry.adapters:
        return None
    return AdapterRouting(
        adapters=dict(entry.adapters),
        default=job_model if job_model in entry.adapters else None,
        base_names=[catalog_name, *names_of(config, catalog_name)],
    )
