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


class NodeResources(BaseModel):
    """What one alive Ray node offers engines."""

    gpus: float = 0
    accelerator_type: Optional[str] = None  # Ray's `accelerator_type:<name>`; None: unknown


def cluster_nodes(ray_nodes: list[dict]) -> list[NodeResources]:
    """`ray.nodes()` → the alive nodes' GPUs and GPU type."""
    nodes = []
    for node in ray_nodes:
        if not node.get("Alive"):
            continue
        resources = node.get("Resources", {})
        types = [key.split(":", 1)[1] for key in resources if key.startswith("accelerator_type:")]
        nodes.append(NodeResources(gpus=resources.get("GPU", 0.0), accelerator_type=types[0] if types else None))
    return nodes


class EnginePlan(BaseModel):
    """How a model's replicas are placed: how many fit, GPUs each, on which GPU types,
    and the vLLM arguments."""

    device: str  # "gpu" | "cpu"
    replicas: int  # config.replicas, else as many as the capable GPUs fit (1 on CPU)
    gpus_per_replica: int  # tensor_parallel_size x pipeline_parallel_size
    pipeline_parallel_size: int = 1
    replicas_by_type: dict[str, int] = {}  # capable GPU type ("" unknown) → replicas that fit
    engine_args: dict[str, Any]

    @property
    def accelerator_types(self) -> list[str]:
        """The GPU types replicas may use; empty: any (CPU, or types Ray does not name)."""
        return sorted(t for t in self.replicas_by_type if t)


def _capable(accelerator: Optional[str], rule: PrecisionRule) -> bool:
    # A GPU type Ray does not name, or one missing from the table, is given the benefit
    # of the doubt: vLLM itself says so at start if it cannot serve the precision.
    if rule.min_compute_capability is None or accelerator is None:
        return True
    return COMPUTE_CAPABILITY.get(accelerator, 99) >= rule.min_compute_capability


def plan_engines(config: EngineConfig, precision: Precision, nodes: list[NodeResources]) -> EnginePlan:
    """Decide placement (pure: nodes in, plan out). Raises PrecisionNotServable or
    ConfigError with the reason, before any engine starts."""
    rule = precision_rule(precision)
    tp, pp = config.tensor_parallel_size, config.pipeline_parallel_size
    engine_args: dict[str, Any] = {
        "max_num_seqs": config.max_num_seqs,
        "enable_prefix_caching": True,
        **rule.engine_args,
    }
    if config.max_model_len:
        engine_args["max_model_len"] = config.max_model_len
    if config.task == "embed":  # before config.engine_args, which may name another converter
        engine_args.update(runner="pooling", convert="embed")
    gpu_nodes = [n for n in nodes if n.gpus >= 1]

    if not gpu_nodes:
        if rule.min_compute_capability is not None:
            raise PrecisionNotServable(
                f"precision {precision.value} cannot be served: this cluster has no GPU "
                f"and {rule.why}"
            )
        if tp > 1 or pp > 1:
            raise ConfigError("tensor_parallel_size and pipeline_parallel_size above 1 need GPUs; this cluster has none")
        engine_args.update(config.engine_args)
        return EnginePlan(device="cpu", replicas=config.replicas or 1, gpus_per_replica=0, engine_args=engine_args)

    capable = [n for n in gpu_nodes if _capable(n.accelerator_type, rule)]
    if not capable:
        types = sorted({n.accelerator_type for n in gpu_nodes if n.accelerator_type})
        raise PrecisionNotServable(
            f"precision {precision.value} cannot be served on {', '.join(types)}: {rule.why}"
        )
    # A replica's tensor-parallel group sits on one node; its pipeline stages may sit on
    # different nodes, all of one GPU type.
    stages: dict[str, int] = {}
    for node in capable:
        kind = node.accelerator_type or ""
        stages[kind] = stages.get(kind, 0) + int(node.gpus) // tp
    if not any(stages.values()):
        raise ConfigError(
            f"tensor_parallel_size {tp} needs {tp} GPUs on one node; the largest node "
            f"{'that can serve ' + precision.value + ' ' if len(capable) < len(gpu_nodes) else ''}"
            f"has {int(max(n.gpus for n in capable))}"
        )
    by_type = {kind: count // pp for kind, count in stages.items() if count // pp}
    if not by_type:
        raise ConfigError(
            f"pipeline_parallel_size {pp} needs {pp} groups of {tp} GPU(s) of one type; "
            f"the cluster has at most {max(stages.values())}"
        )
    engine_args.update(tensor_parallel_size=tp, gpu_memory_utilization=config.gpu_memory_utilization)
    if pp > 1:
        # Stages across nodes: vLLM's Ray executor, inside the replica's placement group.
        engine_args.update(pipeline_parallel_size=pp, distributed_executor_backend="ray")
    engine_args.update(config.engine_args)
    return EnginePlan(
        device="gpu",
        replicas=config.replicas or sum(by_type.values()),
        gpus_per_replica=tp * pp,
        pipeline_parallel_size=pp,
        replicas_by_type=by_type,
        engine_args=engine_args,
    )
