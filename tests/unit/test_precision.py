"""Engine planning (raybatch/precision.py) and replica placement
(raybatch/engines/replica.py): pure functions over logical nodes, so GPU clusters of
any shape are tested on CPU."""

import pytest

from raybatch.config import EngineConfig
from raybatch.engines.replica import ReplicaSpec, placement
from raybatch.exceptions import ConfigError, PrecisionNotServable
from raybatch.precision import NodeResources, cluster_nodes, plan_engines
from raybatch.protocol import Precision

CPU_ONLY = [NodeResources()]


def gpus(kind, *counts):
    return [NodeResources(gpus=n, accelerator_type=kind) for n in counts]


def test_cpu_cluster_runs_one_cpu_engine():
    plan = plan_engines(EngineConfig(), Precision.PRECISION_UNSPECIFIED, CPU_ONLY)
    assert (plan.device, plan.replicas, plan.gpus_per_replica) == ("cpu", 1, 0)
    assert "tensor_parallel_size" not in plan.engine_args


def test_bf16_runs_on_cpu():
    assert plan_engines(EngineConfig(), Precision.BF16, CPU_ONLY).engine_args["dtype"] == "bfloat16"


@pytest.mark.parametrize("precision", [p for p in Precision if p.name.startswith(("FP8", "FP4", "NF4", "FP16"))])
def test_gpu_precisions_are_refused_without_gpus(precision):
    with pytest.raises(PrecisionNotServable, match=f"precision {precision.value} cannot be served: this cluster has no GPU"):
        plan_engines(EngineConfig(), precision, CPU_ONLY)


@pytest.mark.parametrize("parallel", [{"tensor_parallel_size": 2}, {"pipeline_parallel_size": 2}])
def test_parallel_engines_need_gpus(parallel):
    with pytest.raises(ConfigError, match="need GPUs; this cluster has none"):
        plan_engines(EngineConfig(**parallel), Precision.BF16, CPU_ONLY)


@pytest.mark.parametrize("nodes,tp,replicas", [
    ([1], 1, 1), ([2], 1, 2), ([2], 2, 1), ([8], 1, 8), ([8], 4, 2), ([8, 8], 4, 4), ([1, 2, 8], 2, 5),
])
def test_replicas_fill_one_two_and_eight_gpu_nodes(nodes, tp, replicas):
    plan = plan_engines(EngineConfig(tensor_parallel_size=tp), Precision.BF16, gpus("H100", *nodes))
    assert (plan.device, plan.replicas, plan.gpus_per_replica) == ("gpu", replicas, tp)
    assert plan.replicas_by_type == {"H100": replicas} and plan.engine_args["tensor_parallel_size"] == tp


def test_fp8_kv_arguments():
    plan = plan_engines(EngineConfig(tensor_parallel_size=4), Precision.FP8_KV, gpus("H100", 8, 8))
    assert {"quantization": "fp8", "kv_cache_dtype": "fp8", "tensor_parallel_size": 4}.items() <= plan.engine_args.items()


def test_fp8_without_kv_keeps_the_kv_cache_dtype():
    args = plan_engines(EngineConfig(), Precision.FP8_MM, gpus("L4", 1)).engine_args
    assert args["quantization"] == "fp8" and "kv_cache_dtype" not in args


def test_fp8_refused_on_old_gpus_with_the_reason():
    with pytest.raises(PrecisionNotServable, match="FP8 cannot be served on T4: FP8 runs on NVIDIA GPUs of compute capability 8.0"):
        plan_engines(EngineConfig(), Precision.FP8, gpus("T4", 4))


def test_fp4_needs_blackwell():
    with pytest.raises(PrecisionNotServable, match="Blackwell"):
        plan_engines(EngineConfig(), Precision.FP4, gpus("H100", 8))
    assert plan_engines(EngineConfig(), Precision.FP4, gpus("B200", 8)).engine_args["quantization"] == "modelopt_fp4"


def test_mixed_cluster_counts_only_the_gpu_types_that_serve_the_precision():
    nodes = gpus("T4", 4, 4) + gpus("H100", 2) + gpus("A100", 8)
    plan = plan_engines(EngineConfig(tensor_parallel_size=2), Precision.FP8, nodes)
    assert plan.replicas_by_type == {"H100": 1, "A100": 4} and plan.replicas == 5
    assert plan.accelerator_types == ["A100", "H100"]
    # BF16 runs on all of them.
    assert plan_engines(EngineConfig(), Precision.BF16, nodes).replicas_by_type == {"T4": 8, "H100": 2, "A100": 8}


def test_tensor_parallel_must_fit_one_node():
    with pytest.raises(ConfigError, match="tensor_parallel_size 8 needs 8 GPUs on one node; the largest node has 4"):
        plan_engines(EngineConfig(tensor_parallel_size=8), Precision.BF16, gpus("A100", 4, 4))


def test_tensor_parallel_must_fit_a_capable_node():
    nodes = gpus("T4", 8) + gpus("H100", 4)
    with pytest.raises(ConfigError, match="the largest node that can serve FP8 has 4"):
        plan_engines(EngineConfig(tensor_parallel_size=8), Precision.FP8, nodes)


def test_pipeline_parallel_spans_nodes_of_one_type():
    plan = plan_engines(EngineConfig(tensor_parallel_size=4, pipeline_parallel_size=2), Precision.BF16, gpus("H100", 4, 4, 4))
    assert (plan.replicas, plan.gpus_per_replica, plan.pipeline_parallel_size) == (1, 8, 2)
    assert plan.engine_args["distributed_executor_backend"] == "ray" and plan.engine_args["pipeline_parallel_size"] == 2
    # Stages of different GPU types are not mixed in one replica.
    with pytest.raises(ConfigError, match="pipeline_parallel_size 2 needs 2 groups of 4 GPU"):
        plan_engines(EngineConfig(tensor_parallel_size=4, pipeline_parallel_size=2), Precision.BF16, gpus("H100", 4) + gpus("A100", 4))


def test_explicit_replicas_and_engine_args_win():
    plan = plan_engines(EngineConfig(replicas=2, engine_args={"max_num_seqs": 8}), Precision.BF16, gpus("A100", 8))
    assert plan.replicas == 2 and plan.engine_args["max_num_seqs"] == 8


def test_cluster_nodes_reads_ray_nodes():
    ray_nodes = [
        {"Alive": True, "Resources": {"CPU": 16.0, "GPU": 8.0, "accelerator_type:H100": 1.0}},
        {"Alive": False, "Resources": {"CPU": 16.0, "GPU": 8.0}},
        {"Alive": True, "Resources": {"CPU": 4.0}},
    ]
    assert cluster_nodes(ray_nodes) == [NodeResources(gpus=8, accelerator_type="H100"), NodeResources(gpus=0)]


def test_tensor_parallel_replicas_hold_their_gpus_on_one_node():
    spec = ReplicaSpec(kind="vllm", model="m", engine_args={}, gpus=4, cpus=1)
    where = placement(spec, "H100")
    assert (where.num_gpus, where.num_cpus, where.accelerator_type, where.bundles) == (4, 1, "H100", None)


def test_pipeline_parallel_replicas_take_a_placement_group():
    spec = ReplicaSpec(kind="vllm", model="m", engine_args={}, gpus=4, pipeline_parallel_size=2, resources={"pool-a": 1})
    where = placement(spec, "A100")
    assert where.num_gpus == 0 and where.strategy == "PACK"
    assert where.bundles[0] == {"CPU": 1.0, "pool-a": 1}
    assert where.bundles[1:] == [{"GPU": 1.0, "accelerator_type:A100": 0.001}] * 4


def test_cpu_replicas_reserve_a_cpu_for_the_engine_loop():
    where = placement(ReplicaSpec(kind="vllm", model="m", engine_args={}), None)
    assert (where.num_cpus, where.num_gpus) == (1.0, 0)


def test_specs_differ_by_precision_not_by_placement():
    bf16 = ReplicaSpec(kind="vllm", model="m", engine_args={"dtype": "bfloat16"})
    fp8 = ReplicaSpec(kind="vllm", model="m", engine_args={"quantization": "fp8"})
    assert bf16.key != fp8.key
    assert bf16.key == ReplicaSpec(kind="vllm", model="m", engine_args={"dtype": "bfloat16"}, resources={"x": 1}).key
