"""Engine placement and precision: what each replica gets and which vLLM arguments a
precision stands for, decided from the cluster's resources before any engine starts.

Planning is pure (resources in, plan out), so it is tested on CPU with logical GPU
resources, e.g. `ray.init(num_gpus=8, resources={"accelerator_type:H100": 1})`.
"""

from __future__ import annotations

from typing import Any, Optional

from pydantic import BaseModel

from raybatch.config import EngineConfig
from raybatch.exceptions import ConfigError, PrecisionNotServable
from raybatch.protocol import Precision

# Compute capability of the GPUs Ray names in `accelerator_type:<name>` resources.
COMPUTE_CAPABILITY = {
    "V100": 7.0, "T4": 7.5, "A100": 8.0, "A100-40G": 8.0, "A100-80G": 8.0, "A30": 8.0,
    "A10": 8.6, "A10G": 8.6, "A40": 8.6, "L4": 8.9, "L40": 8.9, "L40S": 8.9,
    "H100": 9.0, "H200": 9.0, "H20": 9.0, "GH200": 9.0, "B200": 10.0, "GB200": 10.0,
    "B300": 10.3, "GB300": 10.3,
}

_FP8_KV = {Precision.FP8_MM_KV_ATTN, Precision.FP8_KV, Precision.FP8_MM_KV_ATTN_V2}
_FP8 = {
    Precision.FP8, Precision.FP8_MM, Precision.FP8_AR, Precision.FP8_MM_V2, Precision.FP8_V2,
} | _FP8_KV


class PrecisionRule(BaseModel):
    engine_args: dict[str, Any]
    min_compute_capability: Optional[float]  # None: no GPU needed
    why: str = ""


def precision_rule(precision: Precision) -> PrecisionRule:
    """vLLM arguments for a precision and the least GPU that runs them."""
    if precision == Precision.PRECISION_UNSPECIFIED:
        return PrecisionRule(engine_args={}, min_compute_capability=None)
    if precision == Precision.BF16:
        return PrecisionRule(engine_args={"dtype": "bfloat16"}, min_compute_capability=None)
    if precision == Precision.FP16:
        return PrecisionRule(
            engine_args={"dtype": "float16"},
            min_compute_capability=7.0,
            why="vLLM's CPU build computes in bfloat16 or float32, not float16",
        )
    if precision in _FP8:
        args: dict[str, Any] = {"quantization": "fp8"}
        if precision in _FP8_KV:
            args["kv_cache_dtype"] = "fp8"
        return PrecisionRule(
            engine_args=args,
            min_compute_capability=8.0,
            why="FP8 runs on NVIDIA GPUs of compute capability 8.0 or newer "
            "(weight-only on Ampere, full FP8 from Ada/Hopper)",
        )
    if precision == Precision.NF4:
        return PrecisionRule(
            engine_args={"quantization": "bitsandbytes"},
            min_compute_capability=7.0,
            why="NF4 uses bitsandbytes CUDA kernels",
        )
    if precision == Precision.FP4_MX_MOE:
        return PrecisionRule(
            engine_args={"quantization": "mxfp4"},
            min_compute_capability=8.0,
            why="MXFP4 runs on NVIDIA GPUs of compute capability 8.0 or newer",
        )
    # FP4 and FP4_BLOCKSCALED_MM: NVFP4 block-scaled matmuls exist only on Blackwell.
    return PrecisionRule(
        engine_args={"quantization": "modelopt_fp4"},
        min_compute_capability=10.0,
        why="NVFP4 needs Blackwell GPUs (compute capability 10.0, e.g. B200) and an "
        "NVFP4-quantized checkpoint",
    )


class EnginePlan(BaseModel):
    """How the engine stage is placed: replicas, GPUs each, and vLLM arguments."""

    device: str  # "gpu" | "cpu"
    replicas: int
    gpus_per_replica: int
    accelerator_type: Optional[str]
    engine_args: dict[str, Any]


def plan_engines(
    config: EngineConfig,
    precision: Precision,
    total_resources: dict[str, float],
    gpus_per_node: list[float],
) -> EnginePlan:
    """Decide placement. Raises PrecisionNotServable or ConfigError with the reason."""
    rule = precision_rule(precision)
    total_gpus = int(total_resources.get("GPU", 0))
    accelerators = sorted(
        key.split(":", 1)[1] for key in total_resources if key.startswith("accelerator_type:")
    )
    engine_args: dict[str, Any] = {
        "max_num_seqs": config.max_num_seqs,
        "enable_prefix_caching": True,
        **rule.engine_args,
    }
    if config.max_model_len:
        engine_args["max_model_len"] = config.max_model_len
    engine_args.update(config.engine_args)

    if total_gpus == 0:
        if rule.min_compute_capability is not None:
            raise PrecisionNotServable(
                f"precision {precision.value} cannot be served: this cluster has no GPU "
                f"and {rule.why}"
            )
        if config.tensor_parallel_size > 1:
            raise ConfigError("tensor_parallel_size > 1 needs GPUs; this cluster has none")
        return EnginePlan(
            device="cpu",
            replicas=config.replicas or 1,
            gpus_per_replica=0,
            accelerator_type=None,
            engine_args=engine_args,
        )

    tp = config.tensor_parallel_size
    if not any(gpus >= tp for gpus in gpus_per_node):
        raise ConfigError(
            f"tensor_parallel_size {tp} needs {tp} GPUs on one node; the largest node "
            f"has {int(max(gpus_per_node, default=0))}"
        )
    accelerator = accelerators[0] if len(accelerators) == 1 else None
    if rule.min_compute_capability is not None and accelerators:
        capable = [a for a in accelerators if COMPUTE_CAPABILITY.get(a, 99) >= rule.min_compute_capability]
        if not capable:
            raise PrecisionNotServable(
                f"precision {precision.value} cannot be served on {', '.join(accelerators)}: "
                f"{rule.why}"
            )
        accelerator = capable[0] if len(capable) < len(accelerators) else accelerator
    replicas = config.replicas or max(1, sum(int(g) // tp for g in gpus_per_node))
    engine_args.update(tensor_parallel_size=tp, gpu_memory_utilization=config.gpu_memory_utilization)
    return EnginePlan(
        device="gpu",
        replicas=replicas,
        gpus_per_replica=tp,
        accelerator_type=accelerator,
        engine_args=engine_args,
    )
