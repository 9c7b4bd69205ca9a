"""The deployment configs: raybatch/deploy/serve.yaml (`serve deploy`),
cluster/rayservice.yaml (KubeRay; rendered from helm/raybatch, see test_helm_chart.py),
the `ray up` configs cluster/aws.yaml and cluster/gcp.yaml, and the RayJob
cluster/rayjob.yaml. No Ray cluster, no Kubernetes, no cloud: the files are checked
against Serve's, Ray's autoscaler's and KubeRay's schemas, our ServiceConfig and
`raybatch run`'s flags, and each other."""

from __future__ import annotations

import importlib
from importlib import resources
from pathlib import Path

import pytest
import yaml

from raybatch.config import EngineConfig, ServiceConfig

ROOT = Path(__file__).resolve().parents[2]
SERVE_YAML = ROOT / "raybatch" / "deploy" / "serve.yaml"
RAYSERVICE_YAML = ROOT / "cluster" / "rayservice.yaml"


@pytest.fixture(scope="module")
def serve_config() -> dict:
    return yaml.safe_load(SERVE_YAML.read_text())


@pytest.fixture(scope="module")
def rayservice() -> dict:
    return yaml.safe_load(RAYSERVICE_YAML.read_text())


@pytest.fixture(scope="module")
def app_config(serve_config) -> dict:
    (app,) = serve_config["applications"]
    return app


def test_serve_yaml_is_a_valid_serve_config(serve_config):
    from ray.serve.schema import ServeDeploySchema

    schema = ServeDeploySchema.model_validate(serve_config)
    assert (schema.http_options.host, schema.http_options.port) == ("0.0.0.0", 8000)
    (app,) = schema.applications
    assert (app.name, app.route_prefix, app.import_path) == ("raybatch", "/", "raybatch.api.app:build_app")


def test_serve_yaml_args_are_a_service_config(app_config):
    config = ServiceConfig.model_validate(app_config["args"])
    assert config.storage.startswith("s3://"), "a cluster's storage must be reachable from every node"
    assert config.models, "the example should show a model entry"
    for entry in config.models.values():
        # ModelEntry.engine is a plain dict; a typo there would surface only when a job runs.
        EngineConfig.model_validate(entry.engine)


def test_import_path_builds_an_application_without_a_cluster(app_config):
    import ray
    from ray.serve import Application

    module_name, _, attribute = app_config["import_path"].partition(":")
    builder = getattr(importlib.import_module(module_name), attribute)
    from raybatch.api.app import build_app

    assert builder is build_app
    was_initialized = ray.is_initialized()
    assert isinstance(builder(app_config["args"]), Application)
    assert ray.is_initialized() == was_initialized, "binding the app must not start or join Ray"


def test_serve_yaml_ships_in_the_package():
    shipped = resources.files("raybatch.deploy") / "serve.yaml"
    assert shipped.is_file()


def test_rayservice_serve_config_is_serve_yaml(rayservice, serve_config):
    assert rayservice["apiVersion"] == "ray.io/v1" and rayservice["kind"] == "RayService"
    embedded = rayservice["spec"]["serveConfigV2"]
    assert isinstance(embedded, str), "KubeRay takes serveConfigV2 as a YAML string"
    assert yaml.safe_load(embedded) == serve_config, "cluster/rayservice.yaml drifted from raybatch/deploy/serve.yaml"


def test_rayservice_head_takes_no_engines(rayservice):
    cluster = rayservice["spec"]["rayClusterConfig"]
    head = cluster["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    assert head["rayStartParams"]["dashboard-host"] == "0.0.0.0"
    (container,) = head["template"]["spec"]["containers"]
    assert "nvidia.com/gpu" not in container["resources"].get("limits", {})
    assert cluster["authOptions"]["mode"] == "token"


def test_rayservice_gpu_workers_fit_the_models(rayservice, app_config):
    cluster = rayservice["spec"]["rayClusterConfig"]
    (group,) = [g for g in cluster["workerGroupSpecs"] if g["groupName"] == "gpu-workers"]
    assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    (container,) = group["template"]["spec"]["containers"]
    gpus = int(container["resources"]["limits"]["nvidia.com/gpu"])
    assert gpus >= 1
    # A replica's GPUs are all on one node (one pod here).
    for entry in app_config["args"]["models"].values():
        assert EngineConfig.model_validate(entry["engine"]).tensor_parallel_size <= gpus


def test_rayservice_pods_get_s3_credentials(rayservice):
    cluster = rayservice["spec"]["rayClusterConfig"]
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    for group in groups:
        for container in group["template"]["spec"]["containers"]:
            secrets = [source["secretRef"]["name"] for source in container.get("envFrom", []) if "secretRef" in source]
            assert "raybatch-s3" in secrets


# ---------------------------------------------------------------- ray up, RayJob


@pytest.mark.parametrize("name", ["aws.yaml", "gcp.yaml"])
def test_ray_up_configs_are_valid_for_the_autoscaler(name):
    import json

    import jsonschema
    import ray.autoscaler

    config = yaml.safe_load((ROOT / "cluster" / name).read_text())
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(config, schema)
    head = config["available_node_types"][config["head_node_type"]]
    assert head["resources"] == {"CPU": 0}, "no engine or Ray Data task on the head"
    workers = {n: t for n, t in config["available_node_types"].items() if n != config["head_node_type"]}
    assert sorted(workers) == ["a100", "h100", "l4"] and all(t["resources"]["GPU"] >= 1 for t in workers.values())
    commands = " ".join(config["setup_commands"] + config["head_start_ray_commands"] + config["worker_start_ray_commands"])
    assert "raybatch" in " ".join(config["setup_commands"])
    assert commands.count("RAY_AUTH_MODE=token") >= 3, "every ray start keeps token auth on"
    assert "AWS_SECRET_ACCESS_KEY=" not in yaml.safe_dump(config["available_node_types"]), "credentials come from the node's role"


def test_rayjob_runs_raybatch_run_and_tears_down():
    import gzip
    import json
    import shlex

    import jsonschema

    from raybatch.cli.app import build_parser
    from raybatch.cli.run import _build_config

    job = yaml.safe_load((ROOT / "cluster" / "rayjob.yaml").read_text())
    schemas = json.loads(gzip.decompress((ROOT / "cluster" / "kuberay-v1.5.1-schemas.json.gz").read_bytes()))
    jsonschema.Draft7Validator(schemas["RayJob"]).validate(job)
    from tests.unit.test_helm_chart import assert_valid_kubernetes, embedded_core_objects, unknown_fields

    assert unknown_fields(job, schemas["RayJob"]) == []
    # The submitter's and the Ray pods' templates, against Kubernetes' own schema (strict).
    embedded = embedded_core_objects(job)
    assert len(embedded) == 1 + len(job["spec"]["rayClusterSpec"]["workerGroupSpecs"]) + 1
    for document in embedded:
        assert_valid_kubernetes(document)
    assert job["spec"]["shutdownAfterJobFinishes"] is True
    args = build_parser().parse_args(shlex.split(job["spec"]["entrypoint"])[1:])
    config = _build_config(args)
    assert config.input.startswith("s3://") and config.output.startswith("s3://")
    cluster = job["spec"]["rayClusterSpec"]
    assert cluster["authOptions"]["mode"] == "token" and cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
