"""The Helm chart: lint and render it offline with Helm's own library (helm-python-sdk), validate
every manifest against the Kubernetes schemas (kubernetes-validate, strict), and check the facts
that matter: probes, security context, grace period, GPU request, HPA metrics, ServiceMonitor,
and a dashboard whose metric names a real server exports.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import httpx
import kubernetes_validate
import numpy as np
import pytest
import yaml

from serving.settings import Settings

helm = pytest.importorskip("helm_python", reason="helm-python-sdk (dev group) is not installed")

PROJECT = Path(__file__).resolve().parents[2]
CHART = PROJECT / "helm" / "slimserve"
KUBE_VERSION = "1.30.0"
# Custom resources kubernetes-validate has no schema for (their CRDs live in the operator).
CRD_GROUPS = ("monitoring.coreos.com/",)

GPU = {"gpu": {"enabled": True, "count": 2}}
HPA_QUEUE = {
    "autoscaling": {
        "enabled": True,
        "minReplicas": 2,
        "maxReplicas": 8,
        "queueTime": {"enabled": True, "targetAverageValue": "20000"},
    }
}
SERVICE_MONITOR = {"serviceMonitor": {"enabled": True, "labels": {"release": "prom"}}}
OBJECT_STORAGE = {
    "modelRepository": {
        "source": "objectStorage",
        "objectStorage": {"uri": "s3://models/prod", "credentialsSecret": "s3-creds"},
    },
    "apiKeys": {"existingSecret": "slimserve-keys"},
}
VARIANTS = {
    "default": {},
    "gpu": GPU,
    "hpa-queue-time": HPA_QUEUE,
    "service-monitor": SERVICE_MONITOR,
    "object-storage": OBJECT_STORAGE,
    "image-repository": {"modelRepository": {"source": "image"}, "replicaCount": 3},
}


@pytest.fixture(scope="module")
def chart():
    loaded = helm.Chart.load(CHART)
    yield loaded
    loaded.close()


def render(chart, values: dict[str, Any] | None = None) -> dict[str, list[dict[str, Any]]]:
    """Rendered manifests by kind (NOTES.txt and empty templates left out)."""
    by_kind: dict[str, list[dict[str, Any]]] = {}
    for path, text in chart.render(values or {}, name="rel", namespace="ml").items():
        if path.endswith("NOTES.txt"):
            continue
        for doc in yaml.safe_load_all(text):
            if doc:
                by_kind.setdefault(doc["kind"], []).append(doc)
    return by_kind


def one(manifests: dict[str, list[dict[str, Any]]], kind: str) -> dict[str, Any]:
    assert len(manifests.get(kind, [])) == 1, f"expected one {kind}, got {manifests.get(kind)}"
    return manifests[kind][0]


def container(manifests: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    return one(manifests, "Deployment")["spec"]["template"]["spec"]["containers"][0]


def settings_map(manifests: dict[str, list[dict[str, Any]]]) -> dict[str, str]:
    return next(
        c["data"] for c in manifests["ConfigMap"] if not c["metadata"]["name"].endswith("dashboard")
    )


# -- lint and schema validation ----------------------------------------------------------------


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_helm_lint_strict(variant: str) -> None:
    report = helm.lint(CHART, VARIANTS[variant], strict=True, kube_version=f"v{KUBE_VERSION}")
    assert report["errors"] == []
    assert [m for m in report["messages"] if m["severity"] >= 2] == []


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_every_manifest_validates_against_kubernetes_schemas(chart, variant: str) -> None:
    manifests = render(chart, VARIANTS[variant])
    skipped = []
    for docs in manifests.values():
        for doc in docs:
            if doc["apiVersion"].startswith(CRD_GROUPS):
                skipped.append(doc["kind"])  # CRD: no schema shipped; checked field by field below
                continue
            kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)
    assert skipped == (["ServiceMonitor"] if variant == "service-monitor" else [])


def test_schema_validation_really_rejects_bad_manifests(chart) -> None:
    deployment = one(render(chart), "Deployment")
    deployment["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError, match="readinesProbe"):
        kubernetes_validate.validate(deployment, KUBE_VERSION, strict=True)


# -- default release ---------------------------------------------------------------------------


def test_default_release_objects(chart) -> None:
    manifests = render(chart)
    assert sorted(manifests) == [
        "ConfigMap",
        "Deployment",
        "PersistentVolumeClaim",
        "Pod",  # the helm test hook
        "Service",
        "ServiceAccount",
    ]
    assert len(manifests["ConfigMap"]) == 2  # settings + Grafana dashboard
    pvc = one(manifests, "PersistentVolumeClaim")
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    assert pvc["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    volumes = {
        v["name"]: v for v in one(manifests, "Deployment")["spec"]["template"]["spec"]["volumes"]
    }
    assert (
        volumes["model-repository"]["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"]
    )


def test_probes_ports_and_service_line_up(chart) -> None:
    manifests = render(chart)
    main = container(manifests)
    settings = settings_map(manifests)
    (port,) = main["ports"]
    assert port == {"name": "http", "containerPort": 8000, "protocol": "TCP"}
    assert settings["SLIMSERVE_PORT"] == "8000"
    assert settings["SLIMSERVE_HOST"] == "0.0.0.0"
    assert main["livenessProbe"]["httpGet"] == {"path": "/v2/health/live", "port": "http"}
    assert main["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": "http"}
    assert main["startupProbe"]["httpGet"]["path"] == "/v2/health/live"
    service = one(manifests, "Service")
    assert service["spec"]["ports"][0]["targetPort"] == "http"
    assert service["spec"]["selector"].items() <= (
        one(manifests, "Deployment")["spec"]["template"]["metadata"]["labels"].items()
    )
    pod = one(manifests, "Pod")
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    assert "/v2/health/ready" in pod["spec"]["containers"][0]["command"][-1]


def test_security_context_non_root_read_only_with_tmp(chart) -> None:
    manifests = render(chart)
    spec = one(manifests, "Deployment")["spec"]["template"]["spec"]
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["runAsUser"] == 10001  # the Dockerfile's USER
    assert spec["automountServiceAccountToken"] is False
    main = container(manifests)
    assert main["securityContext"]["readOnlyRootFilesystem"] is True
    assert main["securityContext"]["allowPrivilegeEscalation"] is False
    assert main["securityContext"]["capabilities"]["drop"] == ["ALL"]
    mounts = {m["mountPath"]: m["name"] for m in main["volumeMounts"]}
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert "emptyDir" in volumes[mounts["/tmp"]]
    settings = settings_map(manifests)
    # everything the server writes lies on a volume
    assert mounts[settings["SLIMSERVE_JOBS_DIR"]] == "jobs"
    assert mounts[settings["SLIMSERVE_REPOSITORY"]] == "model-repository"


@pytest.mark.parametrize(("drain", "pre_stop"), [(30, 5), (120, 10)])
def test_grace_period_covers_pre_stop_and_drain(chart, drain: int, pre_stop: int) -> None:
    manifests = render(
        chart, {"server": {"drainTimeoutSeconds": drain, "preStopSleepSeconds": pre_stop}}
    )
    spec = one(manifests, "Deployment")["spec"]["template"]["spec"]
    assert settings_map(manifests)["SLIMSERVE_DRAIN_TIMEOUT_S"] == str(drain)
    assert spec["containers"][0]["lifecycle"]["preStop"]["exec"]["command"] == [
        "sleep",
        str(pre_stop),
    ]
    assert spec["terminationGracePeriodSeconds"] == pre_stop + drain + 5


def test_settings_configmap_is_what_the_server_reads(chart, monkeypatch) -> None:
    manifests = render(
        chart,
        {
            "server": {
                "modelControlMode": "poll",
                "extraSettings": {"max_body_bytes": 1048576000, "poll_interval_s": 2.5},
            }
        },
    )
    settings = settings_map(manifests)
    fields = {f"SLIMSERVE_{name.upper()}" for name in Settings.model_fields}
    assert set(settings) <= fields, set(settings) - fields
    for key, value in settings.items():
        monkeypatch.setenv(key, value)
    parsed = Settings()
    assert parsed.model_control_mode == "poll"
    assert settings["SLIMSERVE_MAX_BODY_BYTES"] == "1048576000"  # not 1.048576e+09
    assert parsed.max_body_bytes == 1048576000
    assert parsed.poll_interval_s == 2.5
    assert str(parsed.repository) == "/models"
    assert parsed.drain_timeout_s == 30.0


def test_config_checksum_rolls_pods_on_settings_change(chart) -> None:
    def checksum(values: dict[str, Any]) -> str:
        deployment = one(render(chart, values), "Deployment")
        return deployment["spec"]["template"]["metadata"]["annotations"]["checksum/config"]

    assert checksum({}) == checksum({})
    assert checksum({}) != checksum({"server": {"logLevel": "debug"}})


# -- variants ----------------------------------------------------------------------------------


def test_gpu_variant_requests_gpus_and_tolerates_gpu_nodes(chart) -> None:
    manifests = render(chart, GPU)
    main = container(manifests)
    assert main["resources"]["limits"]["nvidia.com/gpu"] == 2
    assert main["resources"]["limits"]["memory"] == "4Gi"
    assert main["resources"]["requests"] == {"cpu": "1", "memory": "1Gi"}
    assert main["image"].endswith(":0.1.0-gpu")
    spec = one(manifests, "Deployment")["spec"]["template"]["spec"]
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec[
        "tolerations"
    ]
    cpu = container(render(chart))
    assert "nvidia.com/gpu" not in cpu["resources"]["limits"]
    assert cpu["image"].endswith(":0.1.0")


def test_hpa_on_cpu_and_queue_time_pods_metric(chart) -> None:
    manifests = render(chart, HPA_QUEUE)
    hpa = one(manifests, "HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": one(manifests, "Deployment")["metadata"]["name"],
    }
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (2, 8)
    metrics = {m["type"]: m for m in hpa["spec"]["metrics"]}
    assert metrics["Resource"]["resource"] == {
        "name": "cpu",
        "target": {"type": "Utilization", "averageUtilization": 80},
    }
    assert metrics["Pods"]["pods"] == {
        "metric": {"name": "avg_time_queue_us"},
        "target": {"type": "AverageValue", "averageValue": "20000"},
    }
    assert "replicas" not in one(manifests, "Deployment")["spec"]  # the HPA owns it
    assert one(manifests, "PodDisruptionBudget")["spec"]["minAvailable"] == 1


def test_hpa_defaults_to_cpu_only_and_needs_a_metric(chart) -> None:
    hpa = one(render(chart, {"autoscaling": {"enabled": True}}), "HorizontalPodAutoscaler")
    assert [m["type"] for m in hpa["spec"]["metrics"]] == ["Resource"]
    with pytest.raises(helm.HelmError, match=r"autoscaling\.enabled needs a metric"):
        render(chart, {"autoscaling": {"enabled": True, "targetCPUUtilizationPercentage": None}})


def test_pdb_only_when_two_replicas_always_run(chart) -> None:
    assert "PodDisruptionBudget" not in render(chart)
    assert "PodDisruptionBudget" not in render(chart, {"autoscaling": {"enabled": True}})
    pdb = one(render(chart, {"replicaCount": 3}), "PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"] == {
        "app.kubernetes.io/name": "slimserve",
        "app.kubernetes.io/instance": "rel",
    }


def test_service_monitor_scrapes_the_metrics_port(chart) -> None:
    manifests = render(chart, SERVICE_MONITOR)
    monitor = one(manifests, "ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["metadata"]["labels"]["release"] == "prom"
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint == {
        "port": "http",
        "path": "/metrics",
        "interval": "15s",
        "scrapeTimeout": "10s",
    }
    service = one(manifests, "Service")
    assert (
        monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    )
    assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": ["ml"]}


def test_object_storage_init_container_and_api_key_secret(chart) -> None:
    manifests = render(chart, OBJECT_STORAGE)
    assert "PersistentVolumeClaim" not in manifests
    spec = one(manifests, "Deployment")["spec"]["template"]["spec"]
    (init,) = spec["initContainers"]
    env = {e["name"]: e.get("value") for e in init["env"]}
    assert env["MODEL_REPOSITORY_URI"] == "s3://models/prod"
    assert env["MODEL_REPOSITORY_PATH"] == "/models"
    assert init["envFrom"] == [{"secretRef": {"name": "s3-creds"}}]
    assert init["securityContext"]["readOnlyRootFilesystem"] is True
    assert {"name": "model-repository", "mountPath": "/models"} in init["volumeMounts"]
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert "emptyDir" in volumes["model-repository"]
    server = spec["containers"][0]
    env = {e["name"]: e["value"] for e in server["env"]}
    # the settings serving/settings.py reads; metrics has no key by default (scope open)
    assert env == {
        "SLIMSERVE_INFER_API_KEY_FILE": "/etc/slimserve/api-keys/infer",
        "SLIMSERVE_ADMIN_API_KEY_FILE": "/etc/slimserve/api-keys/admin",
    }
    assert {"name": "api-keys", "mountPath": "/etc/slimserve/api-keys", "readOnly": True} in (
        server["volumeMounts"]
    )
    secret = volumes["api-keys"]["secret"]
    assert secret["secretName"] == "slimserve-keys"
    assert secret["items"] == [
        {"key": "infer-api-key", "path": "infer"},
        {"key": "admin-api-key", "path": "admin"},
    ]
    assert "Secret" not in manifests  # referenced, never created from values


def test_metrics_key_is_mounted_and_used_by_the_service_monitor(chart) -> None:
    values = {
        **SERVICE_MONITOR,
        "apiKeys": {"existingSecret": "keys", "metricsKey": "scrape", "inferKey": ""},
    }
    manifests = render(chart, values)
    server = container(manifests)
    env = {e["name"]: e["value"] for e in server["env"]}
    assert env == {
        "SLIMSERVE_ADMIN_API_KEY_FILE": "/etc/slimserve/api-keys/admin",
        "SLIMSERVE_METRICS_API_KEY_FILE": "/etc/slimserve/api-keys/metrics",
    }
    (endpoint,) = one(manifests, "ServiceMonitor")["spec"]["endpoints"]
    assert endpoint["authorization"] == {
        "type": "Bearer",
        "credentials": {"name": "keys", "key": "scrape"},
    }


def test_no_api_key_secret_means_no_key_settings(chart) -> None:
    manifests = render(chart, {})
    server = container(manifests)
    assert "env" not in server
    assert "api-keys" not in {m["name"] for m in server["volumeMounts"]}


def test_image_repository_source_mounts_nothing_on_models(chart) -> None:
    manifests = render(chart, {"modelRepository": {"source": "image"}})
    assert "PersistentVolumeClaim" not in manifests
    mounts = [m["mountPath"] for m in container(manifests)["volumeMounts"]]
    assert "/models" not in mounts


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"modelRepository": {"source": "ftp"}}, "/modelRepository/source"),
        ({"server": {"logLevel": "loud"}}, "/server/logLevel"),
        ({"server": {"drainTimeout": 3}}, "'drainTimeout' not allowed"),
        ({"server": {"extraSettings": {"Bad-Key": "1"}}}, "'Bad-Key' does not match pattern"),
        ({"gpu": {"enabled": True, "count": 0}}, "/gpu/count"),
        ({"modelRepository": {"mountPath": "models"}}, "/modelRepository/mountPath"),
    ],
)
def test_values_schema_rejects_mistakes_by_name(chart, values: dict, message: str) -> None:
    with pytest.raises(helm.HelmValuesError, match=re.escape(message)):
        chart.validate_schema(values)
    with pytest.raises(helm.HelmValuesError, match=re.escape(message)):
        render(chart, values)


def test_values_schema_accepts_every_variant(chart) -> None:
    for values in VARIANTS.values():
        chart.validate_schema(values)


def test_notes_render_for_every_variant(chart) -> None:
    for values in VARIANTS.values():
        notes = chart.render(values, name="rel", namespace="ml")["slimserve/templates/NOTES.txt"]
        assert "rel-slimserve.ml.svc:8000" in notes
    queue = chart.render(HPA_QUEUE, name="rel", namespace="ml")["slimserve/templates/NOTES.txt"]
    assert "avg_time_queue_us" in queue


# -- Grafana dashboard -------------------------------------------------------------------------

METRIC = re.compile(r"\b((?:nv_inference|slimserve)_[a-z_]+)\b")


def _dashboard(chart) -> dict[str, Any]:
    (config_map,) = [
        c for c in render(chart)["ConfigMap"] if c["metadata"]["name"].endswith("-dashboard")
    ]
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    return json.loads(config_map["data"]["slimserve.json"])


def test_dashboard_panels(chart) -> None:
    dashboard = _dashboard(chart)
    exprs = {p["title"]: " ".join(t["expr"] for t in p["targets"]) for p in dashboard["panels"]}
    assert "nv_inference_request_success" in exprs["Throughput"]
    assert "histogram_quantile(0.50" in exprs["Request latency p50 / p99"]
    assert "histogram_quantile(0.99" in exprs["Request latency p50 / p99"]
    assert "slimserve_request_duration_seconds_bucket" in exprs["Request latency p50 / p99"]
    assert "nv_inference_queue_duration_us" in exprs["Average queue time per request"]
    assert "slimserve_batch_size_bucket" in exprs["Batch size"]
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))


SAMPLE = re.compile(r"^([a-zA-Z_:][\w:]*)(?:\{([^}]*)\})?\s")


def _exported_samples(text: str) -> dict[str, set[str]]:
    """Sample name -> label names, exactly as Prometheus scrapes them (no ``_total`` added)."""
    exported: dict[str, set[str]] = {}
    for line in text.splitlines():
        match = SAMPLE.match(line)
        if match:
            labels = set(re.findall(r'(\w+)="', match.group(2) or ""))
            exported.setdefault(match.group(1), set()).update(labels)
    return exported


def test_dashboard_metrics_are_exported_by_a_real_server(chart, start_server) -> None:
    server = start_server(PROJECT / "model_repository")
    digits = np.load(PROJECT / "bench" / "data" / "digits_test.npz")["x"][:2]
    url = f"{server.url}/v2/models/digits_cnn/infer"
    tensor = {"name": "input", "datatype": "FP32", "shape": [2, 1, 8, 8]}
    good = httpx.post(url, json={"inputs": [{**tensor, "data": digits.ravel().tolist()}]})
    assert good.status_code == 200, good.text
    bad = httpx.post(url, json={"inputs": [{**tensor, "data": [0.0]}]})  # a counted failure
    assert bad.status_code == 400, bad.text
    exported = _exported_samples(httpx.get(f"{server.url}/metrics", timeout=30).text)
    used = set()
    for panel in _dashboard(chart)["panels"]:
        for target in panel["targets"]:
            used.update(METRIC.findall(target["expr"]))
    # shadow panels: exported only while a model is shadowed (checked in tests/e2e/test_shadow.py)
    used = {name for name in used if not name.startswith("slimserve_shadow_")}
    assert len(used) >= 8
    missing = used - set(exported)
    assert not missing, f"dashboard queries metrics the server does not export: {missing}"
    for name in used:
        assert "model" in exported[name], name
    assert "le" in exported["slimserve_request_duration_seconds_bucket"]
    assert "reason" in exported["nv_inference_request_failure"]
