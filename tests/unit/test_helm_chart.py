"""The Helm chart (helm/raybatch), rendered without helm by tests/unit/helm_render.py:
with its defaults it is cluster/rayservice.yaml; with every option on it still renders
valid KubeRay objects (field names checked against KubeRay 1.5.1's CRD schemas), a valid
PodMonitor (prometheus-operator 0.93.0's CRD schema, field names too) and valid
Kubernetes objects (Kubernetes' own schemas, strict, through kubernetes-validate:
the Ingress, the ConfigMap, and the pod templates and Service inside the RayService),
pods run as non-root with resources set. Where `helm` is on PATH, `helm lint` and `helm
template` run too. yamllint runs over the renderings in test_yamllint.py."""

from __future__ import annotations

import copy
import gzip
import json
import re
import shutil
import subprocess
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from raybatch.config import EngineConfig, ServiceConfig
from tests.unit.helm_render import CHART, Renderer, TemplateError, documents

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = ROOT / "cluster"
DEFAULT_VALUES = yaml.safe_load((CHART / "values.yaml").read_text())
# RayService and RayJob openAPIV3Schema of KubeRay v1.5.1's CRDs, descriptions removed
# (docs/deploy.md says how it was made).
KUBERAY_SCHEMAS = json.loads(gzip.decompress((CLUSTER / "kuberay-v1.5.1-schemas.json.gz").read_bytes()))
# The v1 openAPIV3Schema of prometheus-operator v0.93.0's PodMonitor CRD (commit f8fafd4),
# descriptions removed (docs/deploy.md says how it was made).
PODMONITOR_SCHEMA = json.loads(
    gzip.decompress((CLUSTER / "prometheus-operator-v0.93.0-podmonitor-schema.json.gz").read_bytes())
)["PodMonitor"]


def every_option_on() -> dict:
    values = copy.deepcopy(DEFAULT_VALUES)
    values["additionalWorkerGroups"]["h100"]["disabled"] = False
    values["ingress"]["enabled"] = True
    values["metrics"]["podMonitor"]["enabled"] = True
    values["metrics"]["podMonitor"]["labels"] = {"release": "prometheus"}
    values["autoscaling"]["enabled"] = True
    values["serviceAccountName"] = "raybatch"
    values["imagePullSecrets"] = [{"name": "regcred"}]
    values["common"]["env"] = [{"name": "AWS_DEFAULT_REGION", "value": "us-east-1"}]
    values["service"]["annotations"] = {"example.com/lb": "internal"}
    values["head"]["labels"] = {"team": "ml"}
    values["worker"]["nodeSelector"] = {"cloud.google.com/gke-accelerator": "nvidia-l4"}
    return values


def pvc_storage() -> dict:
    values = copy.deepcopy(DEFAULT_VALUES)
    values["storage"] = {**values["storage"], "type": "pvc", "pvc": {"claimName": "shared", "mountPath": "/mnt/rb"}}
    return values


# The renderings every check below runs on.
VALUE_CASES = {"defaults": lambda: None, "all-on": every_option_on, "pvc": pvc_storage}


def rendered(values: dict | None = None) -> dict[str, list[dict]]:
    return {name: documents(text) for name, text in Renderer(values=values).render_all().items()}


def rayservice_of(values: dict | None = None) -> dict:
    (service,) = rendered(values)["rayservice.yaml"]
    return service


def pod_templates(cluster_spec: dict) -> list[dict]:
    return [cluster_spec["headGroupSpec"]["template"]] + [g["template"] for g in cluster_spec["workerGroupSpecs"]]


def unknown_fields(document, schema: dict, path: str = "") -> list[str]:
    """Keys the schema does not declare. Kubernetes silently drops those (CRD schemas
    do not forbid extra keys), so jsonschema alone would not catch a misspelt field."""
    if isinstance(document, list):
        return [bad for i, item in enumerate(document) for bad in unknown_fields(item, schema.get("items", {}), f"{path}[{i}]")]
    if not isinstance(document, dict) or "properties" not in schema:
        if isinstance(document, dict) and isinstance(schema.get("additionalProperties"), dict):
            return [bad for k, v in document.items() for bad in unknown_fields(v, schema["additionalProperties"], f"{path}.{k}")]
        return []
    found = []
    for key, value in document.items():
        if key not in schema["properties"]:
            found.append(f"{path}.{key}")
        else:
            found += unknown_fields(value, schema["properties"][key], f"{path}.{key}")
    return found


def assert_valid_custom_resource(document: dict, schema: dict) -> None:
    jsonschema.Draft7Validator(schema).validate(document)
    assert unknown_fields(document, schema) == []


def assert_valid_kuberay(document: dict) -> None:
    assert_valid_custom_resource(document, KUBERAY_SCHEMAS[document["kind"]])
    for embedded in embedded_core_objects(document):
        assert_valid_kubernetes(embedded)


# Kubernetes' OpenAPI schemas as kubernetes-validate bundles them (offline). 1.31: a
# version KubeRay 1.5 supports and managed clouds still run; a field newer than that
# fails here. Strict: an unknown field fails (the API server would drop it silently).
KUBERNETES_VERSION = "1.31"


def assert_valid_kubernetes(document: dict) -> None:
    try:
        checked = kubernetes_validate.validate(document, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as error:
        where = ".".join(str(part) for part in error.path)
        problem = f"{document['kind']} {document['metadata'].get('name')}: {where}: {error.message}"
    else:
        assert checked == KUBERNETES_VERSION, "kubernetes-validate fell back to another version's schemas"
        return
    # Outside the except: the schema dump of the chained exception would bury the message.
    pytest.fail(problem, pytrace=False)


def embedded_core_objects(document: dict) -> list[dict]:
    """The Kubernetes objects inside a RayService or RayJob, as the objects they are: each
    pod template as a core/v1 PodTemplate and the serve Service as a Service. KubeRay's
    CRD schema copies their fields but not all of Kubernetes' rules (required fields,
    int-or-string, quantities), and the API server checks them only once KubeRay makes
    the pods."""
    spec = document["spec"]
    cluster = spec.get("rayClusterConfig") or spec["rayClusterSpec"]
    templates = pod_templates(cluster) + ([spec["submitterPodTemplate"]] if "submitterPodTemplate" in spec else [])
    name = document["metadata"]["name"]
    objects = [{"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": f"{name}-{i}"}, "template": template}
               for i, template in enumerate(templates)]
    if "serveService" in spec:
        objects.append({"apiVersion": "v1", "kind": "Service", **spec["serveService"]})
    return objects


# ---------------------------------------------------------------- one source


def test_cluster_rayservice_is_the_chart_with_its_defaults():
    assert (CLUSTER / "rayservice.yaml").read_text() == Renderer().render("rayservice.yaml"), (
        "cluster/rayservice.yaml is generated: PYTHONPATH=. .venv/bin/python tests/unit/helm_render.py "
        "> cluster/rayservice.yaml"
    )


def test_dashboard_json_is_one_document_in_two_places():
    chart_copy = (CHART / "files" / "grafana-dashboard.json").read_text()
    assert chart_copy == (CLUSTER / "grafana-dashboard.json").read_text(), "helm can read only files inside the chart"
    (config_map,) = rendered()["grafana-dashboard.yaml"]
    assert json.loads(config_map["data"]["raybatch.json"]) == json.loads(chart_copy)


def test_dashboard_shows_raybatch_metrics():
    dashboard = json.loads((CLUSTER / "grafana-dashboard.json").read_text())
    expressions = [t["expr"] for panel in dashboard["panels"] for t in panel.get("targets", [])]
    names = {name for expr in expressions for name in re.findall(r"\b(ray_raybatch_\w+)", expr)}
    # Issue 13 item 4 (Ray exports ray.util.metrics with its own ray_ prefix).
    for wanted in ("ray_raybatch_jobs", "ray_raybatch_rows_processed_total", "ray_raybatch_rows_failed_total",
                   "ray_raybatch_output_tokens_total", "ray_raybatch_engine_replicas", "ray_raybatch_queue_depth"):
        assert wanted in names
    assert all(expr.count("(") == expr.count(")") for expr in expressions)


# ---------------------------------------------------------------- rendering


@pytest.mark.parametrize("values", [None, every_option_on(), pvc_storage()], ids=["defaults", "all-on", "pvc"])
def test_every_template_renders_valid_objects(values):
    objects = [doc for docs in rendered(values).values() for doc in docs if "kind" in doc]
    kinds = sorted(doc["kind"] for doc in objects)
    expected = ["ConfigMap", "RayService"] + (["Ingress", "PodMonitor"] if values and values["ingress"]["enabled"] else [])
    assert kinds == sorted(expected)
    for doc in objects:
        assert doc["metadata"]["labels"]["app.kubernetes.io/instance"] == "raybatch"
        if doc["kind"] == "RayService":
            assert_valid_kuberay(doc)
        elif doc["kind"] == "PodMonitor":
            # The vendored schema is the CRD's v1 version's.
            assert doc["apiVersion"] == "monitoring.coreos.com/v1"
            assert_valid_custom_resource(doc, PODMONITOR_SCHEMA)
        else:
            assert_valid_kubernetes(doc)


def test_chart_requires_the_kubernetes_its_objects_are_checked_against():
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["kubeVersion"] == f">={KUBERNETES_VERSION}.0-0"


@pytest.mark.parametrize("values", [None, every_option_on(), pvc_storage()], ids=["defaults", "all-on", "pvc"])
def test_serve_config_is_a_service_config(values):
    (app,) = yaml.safe_load(rayservice_of(values)["spec"]["serveConfigV2"])["applications"]
    config = ServiceConfig.model_validate(app["args"])
    for entry in config.models.values():
        EngineConfig.model_validate(entry.engine)
    assert config.storage == ("/mnt/rb/storage" if values and values["storage"]["type"] == "pvc" else "s3://raybatch/storage")


@pytest.mark.parametrize("values", [None, every_option_on(), pvc_storage()], ids=["defaults", "all-on", "pvc"])
def test_pods_run_as_non_root_with_resources(values):
    cluster = rayservice_of(values)["spec"]["rayClusterConfig"]
    for template in pod_templates(cluster):
        spec = template["spec"]
        assert spec["securityContext"]["runAsNonRoot"] is True and spec["securityContext"]["runAsUser"] != 0
        for container in spec["containers"]:
            assert container["securityContext"]["allowPrivilegeEscalation"] is False
            assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
            for kind in ("limits", "requests"):
                assert {"cpu", "memory"} <= set(container["resources"][kind])
            assert any(port["name"] == "metrics" for port in container["ports"])
            secrets = [s["secretRef"]["name"] for s in container["envFrom"]]
            assert "raybatch-hf" in secrets
            assert ("raybatch-s3" in secrets) == (values is None or values["storage"]["type"] == "s3")
            if values and values["storage"]["type"] == "pvc":
                assert {"mountPath": "/mnt/rb", "name": "storage"} in container["volumeMounts"]


def test_head_has_no_engines_and_gpu_groups_by_accelerator():
    cluster = rayservice_of(every_option_on())["spec"]["rayClusterConfig"]
    head = cluster["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    assert "nvidia.com/gpu" not in head["template"]["spec"]["containers"][0]["resources"]["limits"]
    groups = {g["groupName"]: g for g in cluster["workerGroupSpecs"]}
    assert sorted(groups) == ["gpu-workers", "h100-workers"]
    h100 = groups["h100-workers"]
    (container,) = h100["template"]["spec"]["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 8 == container["resources"]["requests"]["nvidia.com/gpu"]
    assert h100["template"]["spec"]["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    assert {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "64Gi"}} in h100["template"]["spec"]["volumes"]
    assert cluster["enableInTreeAutoscaling"] is True and cluster["autoscalerOptions"]["idleTimeoutSeconds"] == 600
    for group in groups.values():
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]


def test_disabled_worker_groups_render_nothing():
    cluster = rayservice_of()["spec"]["rayClusterConfig"]
    assert [g["groupName"] for g in cluster["workerGroupSpecs"]] == ["gpu-workers"]
    assert cluster["enableInTreeAutoscaling"] is False and "autoscalerOptions" not in cluster


def test_ray_token_auth_is_always_on():
    assert rayservice_of()["spec"]["rayClusterConfig"]["authOptions"] == {"mode": "token"}
    values = copy.deepcopy(DEFAULT_VALUES)
    values["rayAuth"]["existingSecret"] = "my-ray-token"
    # secretName needs KubeRay >= 1.6.0: not in the 1.5.1 schema checked above.
    assert rayservice_of(values)["spec"]["rayClusterConfig"]["authOptions"] == {"mode": "token", "secretName": "my-ray-token"}
    assert "my-ray-token" in Renderer(values=values).render("NOTES.txt")


def test_ingress_terminates_tls_in_front_of_the_serve_service():
    objects = {doc["kind"]: doc for docs in rendered(every_option_on()).values() for doc in docs}
    ingress, service = objects["Ingress"], objects["RayService"]
    assert ingress["spec"]["tls"] == [{"hosts": ["raybatch.example.com"], "secretName": "raybatch-tls"}]
    backend = ingress["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
    assert backend == {"name": service["spec"]["serveService"]["metadata"]["name"], "port": {"number": 8000}}
    assert service["spec"]["serveService"]["metadata"]["annotations"] == {"example.com/lb": "internal"}
    monitor = objects["PodMonitor"]
    assert monitor["spec"]["podMetricsEndpoints"] == [{"port": "metrics", "interval": "30s"}]
    assert monitor["metadata"]["labels"]["release"] == "prometheus"


def test_missing_pvc_claim_is_refused():
    values = pvc_storage()
    values["storage"]["pvc"]["claimName"] = ""
    with pytest.raises(TemplateError, match="claimName is required"):
        Renderer(values=values).render("rayservice.yaml")


def test_notes_render():
    notes = Renderer().render("NOTES.txt")
    assert "kubectl port-forward -n default svc/raybatch-serve-svc 8000:8000" in notes
    assert "https://raybatch.example.com" in Renderer(values=every_option_on()).render("NOTES.txt")


def test_every_top_level_value_is_commented():
    lines = (CHART / "values.yaml").read_text().splitlines()
    for number, line in enumerate(lines):
        if re.match(r"[A-Za-z]\w*:", line):
            assert lines[number - 1].startswith("#"), f"values.yaml: {line!r} has no comment above it"


def test_renderer_follows_go_template_rules():
    """The few behaviours the chart leans on, as Go's text/template has them."""
    renderer = Renderer(values={"a": {"b": 2.0, "s": "x"}, "items": {"z": 1, "y": 2}, "empty": []})
    renderer.defines["t"] = []
    from tests.unit.helm_render import _parse, _segments

    def run(text):
        nodes, _, _ = _parse(_segments(text), 0, renderer.defines)
        return renderer._run(nodes, renderer.root, {"$": renderer.root})

    assert run("x  {{- .Values.a.b -}}  y") == "x2y"
    assert run("{{ .Values.missing }}|{{ .Values.a.s | quote }}|{{ default \"d\" .Values.empty }}") == '|"x"|d'
    assert run("{{ range $k, $v := .Values.items }}{{ $k }}={{ $v }},{{ end }}") == "y=2,z=1,"
    assert run("{{ with .Values.empty }}no{{ else }}yes{{ end }}") == "yes"
    assert run("{{ toYaml .Values.a | nindent 2 }}") == "\n  b: 2\n  s: x"
    assert run('{{ "  x\\n" | trim | nindent 2 }}') == "\n  x"
    with pytest.raises(TemplateError, match="nil pointer"):
        run("{{ .Values.missing.key }}")
    with pytest.raises(TemplateError, match="not implemented"):
        run("{{ .Values.a | toJson }}")


# ---------------------------------------------------------------- real helm, when present


@pytest.mark.skipif(shutil.which("helm") is None, reason="helm is not installed here")
def test_helm_lint_and_template_agree():
    subprocess.run(["helm", "lint", str(CHART)], check=True)
    rendered_by_helm = subprocess.run(
        ["helm", "template", "raybatch", str(CHART), "--show-only", "templates/rayservice.yaml"],
        check=True, capture_output=True, text=True,
    ).stdout
    assert documents(rendered_by_helm) == documents((CLUSTER / "rayservice.yaml").read_text())
