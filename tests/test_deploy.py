"""Deployment files checked with the real tools: kustomize renders every Kubernetes variant, which must
validate strictly against the Kubernetes schemas offline; the compose file against the compose
specification's schema; every Dockerfile through hadolint. On the rendered output: the teacher is
enabled and reached by URL, every container is locked down, only the service reaches the teacher."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

import kubernetes_validate
import pytest
import yaml

from service.metrics import Metrics
from service.settings import Settings
from service.teacher_process import free_port
from tests.conftest import ROOT, running_service

K8S = ROOT / "deploy" / "k8s"
TOOLS = Path(sys.executable).parent  # kubectl, hadolint and check-jsonschema come as wheels in the dev extra
KUBERNETES = "1.37.0"
VARIANTS = {"base": K8S / "base", "monitoring": K8S / "monitoring", "prod": K8S / "overlays" / "prod"}
CRDS = {"ServiceMonitor"}  # not in the Kubernetes schemas; checked by field below


def tool(name: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(TOOLS / name), *args], capture_output=True, text=True, timeout=120, check=check)


def rendered(variant: str) -> list[dict]:
    return list(yaml.safe_load_all(tool("kubectl", "kustomize", str(VARIANTS[variant])).stdout))


def find(docs: list[dict], kind: str, name: str) -> dict:
    return next(d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name)


def pod_specs(docs: list[dict]) -> list[dict]:
    return [d["spec"]["template"]["spec"] for d in docs if d["kind"] in ("Deployment", "StatefulSet", "DaemonSet")]


def environment(docs: list[dict], deployment: str) -> dict[str, str]:
    """What the container sees: the image's ENV (from the Dockerfile), then envFrom config maps, then env."""
    env = {}
    for line in (ROOT / "Dockerfile").read_text().replace("\\\n", " ").splitlines():
        if line.startswith("ENV "):
            env |= dict(part.split("=", 1) for part in line[4:].split())
    container = find(docs, "Deployment", deployment)["spec"]["template"]["spec"]["containers"][0]
    for source in container.get("envFrom", []):
        env |= find(docs, "ConfigMap", source["configMapRef"]["name"])["data"]
    env |= {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}
    return env


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_every_variant_renders_and_validates_strictly(variant: str) -> None:
    docs = rendered(variant)
    assert docs
    for doc in docs:
        if doc["kind"] not in CRDS:
            kubernetes_validate.validate(doc, KUBERNETES, strict=True)


def test_strict_validation_rejects_a_misspelt_field() -> None:
    """The schema check is not vacuous: a field Kubernetes does not know is refused."""
    deployment = copy.deepcopy(find(rendered("base"), "Deployment", "sentiment"))
    deployment["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES, strict=True)


def test_the_teacher_is_enabled_and_reached_through_its_service() -> None:
    docs = rendered("base")
    settings = Settings.from_env(environment(docs, "sentiment"))
    assert settings.teacher_enabled and settings.teacher_url
    url = urlsplit(settings.teacher_url)
    service = find(docs, "Service", url.hostname)
    [port] = [p for p in service["spec"]["ports"] if p["port"] == url.port]
    teacher = find(docs, "Deployment", "sentiment-teacher")
    pod = teacher["spec"]["template"]
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    container_ports = {p["name"]: p["containerPort"] for c in pod["spec"]["containers"] for p in c["ports"]}
    assert port["targetPort"] in container_ports
    assert settings.teacher_model == "smollm2-135m-instruct" and settings.teacher_constraint == "gbnf"


def test_the_prod_overlay_uses_an_external_teacher_with_automatic_fallback() -> None:
    docs = rendered("prod")
    assert not [d for d in docs if d["metadata"]["name"] == "sentiment-teacher"]
    settings = Settings.from_env(environment(docs, "sentiment"))
    assert settings.teacher_enabled and settings.fallback == "auto"
    assert urlsplit(settings.teacher_url).hostname.endswith(".svc.cluster.local")
    assert find(docs, "Deployment", "sentiment")["spec"]["replicas"] == 4
    assert {d["kind"] for d in docs} >= {"ServiceMonitor", "HorizontalPodAutoscaler", "ConfigMap"}
    assert {d["metadata"].get("namespace") for d in docs} == {"sentiment"}


@pytest.mark.parametrize("variant", ["base", "prod"])
def test_every_container_is_locked_down(variant: str) -> None:
    specs = pod_specs(rendered(variant))
    assert specs
    for spec in specs:
        assert spec["automountServiceAccountToken"] is False
        for container in spec.get("initContainers", []) + spec["containers"]:
            sc = container["securityContext"]
            assert sc["runAsNonRoot"] is True and sc["readOnlyRootFilesystem"] is True, container["name"]
            assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"]["drop"] == ["ALL"]
            assert sc["seccompProfile"]["type"] == "RuntimeDefault"
            assert container["resources"]["limits"] and container["readinessProbe"] and container["livenessProbe"]
            mounts = {m["mountPath"] for m in container.get("volumeMounts", [])}
            assert "/tmp" in mounts  # the only writable path


def test_only_the_service_reaches_the_teacher() -> None:
    docs = rendered("base")
    policy = find(docs, "NetworkPolicy", "sentiment-teacher")
    teacher_pods = find(docs, "Deployment", "sentiment-teacher")["spec"]["template"]["metadata"]["labels"]
    service_pods = find(docs, "Deployment", "sentiment")["spec"]["template"]["metadata"]["labels"]
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= teacher_pods.items()
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    [rule] = policy["spec"]["ingress"]
    [source] = rule["from"]
    assert set(source) == {"podSelector"} and source["podSelector"]["matchLabels"].items() <= service_pods.items()
    assert not teacher_pods.items() <= source["podSelector"]["matchLabels"].items()
    assert [p["port"] for p in rule["ports"]] == ["http"]


def test_the_service_deployment_gates_on_readiness_and_drains() -> None:
    deployment = find(rendered("base"), "Deployment", "sentiment")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["readinessProbe"]["httpGet"]["path"] == "/health/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/health/live"
    assert container["lifecycle"]["preStop"]["sleep"]["seconds"] > 0
    assert deployment["spec"]["template"]["metadata"]["annotations"]["prometheus.io/path"] == "/metrics"


def test_the_hpa_queue_metric_is_served_by_the_adapter_rule_and_exported_by_the_service() -> None:
    docs = rendered("monitoring") + rendered("base")
    hpa = find(docs, "HorizontalPodAutoscaler", "sentiment")
    metrics = {m["type"]: m for m in hpa["spec"]["metrics"]}
    assert metrics["Resource"]["resource"]["name"] == "cpu"
    wanted = metrics["Pods"]["pods"]["metric"]["name"]
    [rule] = yaml.safe_load(find(docs, "ConfigMap", "sentiment-prometheus-adapter")["data"]["config.yaml"])["rules"]
    assert rule["name"]["as"] == wanted and rule["seriesQuery"].startswith(wanted + "{")
    assert set(rule["resources"]["overrides"]) == {"namespace", "pod"}
    exported = {m.name for m in Metrics().registry.collect()}
    assert wanted in exported


def test_the_service_monitor_selects_the_service_port() -> None:
    docs = rendered("monitoring") + rendered("base")
    monitor = find(docs, "ServiceMonitor", "sentiment")
    service = find(docs, "Service", "sentiment")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    [endpoint] = monitor["spec"]["endpoints"]
    assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]} and endpoint["path"] == "/metrics"


COMPOSE = ROOT / "deploy" / "compose.yaml"


def test_the_compose_file_validates_against_the_compose_specification(tmp_path) -> None:
    ok = tool("check-jsonschema", "--builtin-schema", "vendor.compose-spec", str(COMPOSE), check=False)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    broken = yaml.safe_load(COMPOSE.read_text())
    broken["services"]["sentiment"]["restart_policy"] = "always"  # not a compose key
    (tmp_path / "compose.yaml").write_text(yaml.safe_dump(broken))
    refused = tool("check-jsonschema", "--builtin-schema", "vendor.compose-spec", str(tmp_path / "compose.yaml"),
                   check=False)
    assert refused.returncode != 0


def test_the_compose_stack_wires_teacher_prometheus_and_grafana() -> None:
    compose = yaml.safe_load(COMPOSE.read_text())
    services = compose["services"]
    env = services["sentiment"]["environment"]
    url = urlsplit(env["SENTIMENT_TEACHER_URL"])
    assert url.hostname in services and str(url.port) in services[url.hostname]["expose"]
    assert Settings.from_env(env).teacher_enabled
    for name in ("sentiment", "teacher"):
        build = services[name]["build"]
        assert (COMPOSE.parent / build["context"] / build["dockerfile"]).is_file()
    base = COMPOSE.parent
    mounts = {v.split(":")[1]: base / v.split(":")[0] for s in services.values() for v in s.get("volumes", [])
              if v.startswith("./")}
    assert (mounts["/etc/prometheus"] / "prometheus.yml").is_file()
    assert list((mounts["/var/lib/grafana/dashboards"]).glob("*.json"))
    assert (mounts["/etc/grafana/provisioning"] / "datasources").is_dir()
    prometheus = yaml.safe_load((mounts["/etc/prometheus"] / "prometheus.yml").read_text())
    assert prometheus["scrape_configs"][0]["static_configs"][0]["targets"] == ["sentiment:8000"]


DOCKERFILES = sorted(p for p in ROOT.glob("**/Dockerfile") if ".venv" not in p.parts)


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_dockerfile_passes_hadolint(dockerfile: Path) -> None:
    result = tool("hadolint", str(dockerfile), check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_both_images_run_as_non_root_and_check_their_health() -> None:
    assert len(DOCKERFILES) == 2
    for dockerfile in DOCKERFILES:
        text = dockerfile.read_text()
        final_stage = text[text.rindex("\nFROM "):]
        assert "\nUSER 1000" in final_stage and "\nHEALTHCHECK " in final_stage, dockerfile
    teacher = (ROOT / "deploy" / "teacher" / "Dockerfile").read_text()
    assert "make teacher-wheel" in teacher  # the same portable llama.cpp flags as `make serve`


def test_the_teacher_image_probe_passes_only_on_a_logprob_answer(teacher) -> None:
    """deploy/teacher/probe.py (the image's HEALTHCHECK and startup probe) against the real llama.cpp server."""
    probe = [sys.executable, str(ROOT / "deploy" / "teacher" / "probe.py")]
    answered = subprocess.run(probe, env={"TEACHER_PORT": str(teacher.port)}, capture_output=True, timeout=30)
    assert answered.returncode == 0, answered.stderr
    nobody = subprocess.run(probe, env={"TEACHER_PORT": str(free_port())}, capture_output=True, text=True, timeout=30)
    assert nobody.returncode == 1 and "teacher probe failed" in nobody.stderr


def test_the_service_image_without_a_teacher_url_serves_and_says_why(tiny_model, tmp_path) -> None:
    """The service image carries no llama-cpp-python: with the teacher enabled but no URL the student
    serves, and health, explain and metrics say that no teacher is there and why."""
    shim = tmp_path / "no_llama"
    shim.mkdir()
    (shim / "sitecustomize.py").write_text("import sys\nsys.modules['llama_cpp'] = None  # as if not installed\n")
    with running_service(tiny_model, tmp_path, SENTIMENT_TEACHER_ENABLED="true",
                         PYTHONPATH=f"{shim}:{ROOT}") as svc, svc.client() as client:
        assert client.post("/v1/sentiment", json={"text": "great"}).status_code == 200
        details = client.get("/health/ready").json()["details"]
        assert details["teacher_state"] == "disabled" and "llama-cpp-python is not installed" in details[
            "teacher_last_exit"]
        explain = client.post("/v1/sentiment/explain", json={"text": "meh"})
        assert explain.status_code == 503 and "SENTIMENT_TEACHER_URL is empty" in explain.json()["error"]["message"]
        metrics = client.get("/metrics").text
        assert "sentiment_teacher_enabled 1.0" in metrics and "sentiment_teacher_up 0.0" in metrics
