import pytest

from raybatch.config import EngineConfig
from raybatch.exceptions import ConfigError, PrecisionNotServable
from raybatch.precision import plan_engines
from raybatch.protocol import Precision

CPU_ONLY = {"CPU": 4.0}


def gpu_cluster(kind: str, nodes: list[int]):
    return {"CPU": 64.0, "GPU": float(sum(nodes)), f"accelerator_type:{kind}": float(len(nodes))}, [float(n) for n in nodes]


def test_cpu_cluster_runs_one_cpu_engine():
    plan = plan_engines(EngineConfig(), Precision.PRECISION_UNSPECIFIED, CPU_ONLY, [0.0])
    assert (plan.device, plan.replicas, plan.gpus_per_replica) == ("cpu", 1, 0)
    assert "tensor_parallel_size" not in plan.engine_args


def test_bf16_runs_on_cpu():
    assert plan_engines(EngineConfig(), Precision.BF16, CPU_ONLY, [0.0]).engine_args["dtype"] == "bfloat16"


@pytest.mark.parametrize("precision", [p for p in Precision if p.name.startswith(("FP8", "FP4", "NF4", "FP16"))])
def test_gpu_precisions_are_refused_without_gpus(precision):
    with pytest.raises(PrecisionNotServable, match=f"precision {precision.value} cannot be served: this cluster has no GPU"):
        plan_engines(EngineConfig(), precision, CPU_ONLY, [0.0])


def test_gpu_plan_uses_every_gpu_group():
    resources, nodes = gpu_cluster("H100", [8, 8])
    plan = plan_engines(EngineConfig(tensor_parallel_size=4), Precision.FP8_KV, resources, nodes)
    assert (plan.device, plan.replicas, plan.gpus_per_replica, plan.accelerator_type) == ("gpu", 4, 4, "H100")
    assert {"quantization": "fp8", "kv_cache_dtype": "fp8", "tensor_parallel_size": 4}.items() <= plan.engine_args.items()


def test_fp8_without_kv_keeps_the_kv_cache_dtype():
    resources, nodes = gpu_cluster("L4", [1])
    args = plan_engines(EngineConfig(), Precision.FP8_MM, resources, nodes).engine_args
    assert args["quantization"] == "fp8" and "kv_cache_dtype" not in args


def test_fp8_refused_on_old_gpus_with_the_reason():
    resources, nodes = gpu_cluster("T4", [4])
    with pytest.raises(PrecisionNotServable, match="FP8 cannot be served on T4: FP8 runs on NVIDIA GPUs of compute capability 8.0"):
        plan_engines(EngineConfig(), Precision.FP8, resources, nodes)


def test_fp4_needs_blackwell():
    resources, nodes = gpu_cluster("H100", [8])
    with pytest.raises(PrecisionNotServable, match="Blackwell"):
        plan_engines(EngineConfig(), Precision.FP4, resources, nodes)
    resources, nodes = gpu_cluster("B200", [8])
    assert plan_engines(EngineConfig(), Precision.FP4, resources, nodes).engine_args["quantization"] == "modelopt_fp4"


def test_mixed_cluster_pins_replicas_to_the_capable_gpus():
    resources = {"GPU": 8.0, "accelerator_type:T4": 1.0, "accelerator_type:H100": 1.0}
    plan = plan_engines(EngineConfig(), Precision.FP8, resources, [4.0, 4.0])
    assert plan.accelerator_type == "H100"


def test_tensor_parallel_must_fit_one_node():
    resources, nodes = gpu_cluster("A100", [4, 4])
    with pytest.raises(ConfigError, match="tensor_parallel_size 8 needs 8 GPUs on one node; the largest node has 4"):
        plan_engines(EngineConfig(tensor_parallel_size=8), Precision.BF16, resources, nodes)


def test_explicit_replicas_and_engine_args_win():
    resources, nodes = gpu_cluster("A100", [8])
    plan = plan_engines(EngineConfig(replicas=2, engine_args={"max_num_seqs": 8}), Precision.BF16, resources, nodes)
    assert plan.replicas == 2 and plan.engine_args["max_num_seqs"] == 8
