"""The Kubernetes manifests render with kustomize and validate against the 1.32 schemas."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from tests.conftest import ROOT

K8S = ROOT / "deploy" / "k8s"


def rendered() -> list[dict]:
    kubectl = shutil.which("kubectl")
    if kubectl:
        out = subprocess.run([kubectl, "kustomize", str(K8S)], capture_output=True, text=True, check=True).stdout
        return list(yaml.safe_load_all(out))
    # Without kubectl, validate the resource files themselves (kustomize only adds labels and the config map).
    listed = yaml.safe_load((K8S / "kustomization.yaml").read_text())["resources"]
    return [doc for name in listed for doc in yaml.safe_load_all(Path(K8S / name).read_text())]


def test_manifests_validate_strictly() -> None:
    docs = rendered()
    kinds = sorted(doc["kind"] for doc in docs)
    assert {"Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget"} <= set(kinds)
    for doc in docs:
        kubernetes_validate.validate(doc, "1.32.0", strict=True)


def test_the_service_deployment_gates_on_readiness_and_drains() -> None:
    deployment = next(d for d in rendered() if d["kind"] == "Deployment" and d["metadata"]["name"] == "sentiment")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["readinessProbe"]["httpGet"]["path"] == "/health/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/health/live"
    assert "preStop" in container["lifecycle"]
    assert deployment["spec"]["template"]["metadata"]["annotations"]["prometheus.io/path"] == "/metrics"


@pytest.mark.parametrize("name", ["sentiment-hpa.yaml"])
def test_hpa_scales_on_cpu_and_queue_depth(name) -> None:
    hpa = yaml.safe_load((K8S / name).read_text())
    metrics = {m["type"]: m for m in hpa["spec"]["metrics"]}
    assert metrics["Resource"]["resource"]["name"] == "cpu"
    assert metrics["Pods"]["pods"]["metric"]["name"] == "sentiment_queue_depth"
