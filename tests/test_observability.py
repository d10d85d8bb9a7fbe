"""Prometheus rules and the Grafana dashboard, checked with the real tools: promtool on the configs and
rules (with unit tests per alert), and a real Prometheus scraping the real service under traffic, which
must evaluate every dashboard and rule expression without error and return data for the core ones."""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from bench.dashboard import load_dashboard, panel_queries, render
from bench.prometheus import PROMETHEUS, Prometheus, running_prometheus
from tests.conftest import ROOT, running_service

PROM_DIR = ROOT / "deploy" / "prometheus"
GRAFANA = ROOT / "deploy" / "grafana"
PROMTOOL = shutil.which("promtool")
needs_prometheus = pytest.mark.skipif(PROMETHEUS is None or PROMTOOL is None,
                                      reason="prometheus/promtool not installed (.ci/run installs them)")


def promtool(*args: str, cwd: Path = PROM_DIR) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PROMTOOL, *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def rule_expressions() -> list[tuple[str, str]]:
    """(name, expr) of every recording and alerting rule."""
    return [(rule.get("record") or rule["alert"], rule["expr"])
            for path in sorted((PROM_DIR / "rules").glob("*.yml"))
            for group in yaml.safe_load(path.read_text())["groups"] for rule in group["rules"]]


@needs_prometheus
def test_promtool_accepts_the_configs_and_rules(tmp_path) -> None:
    checked = promtool("check", "config", "prometheus.yml")
    assert checked.returncode == 0, checked.stdout + checked.stderr
    rules = promtool("check", "rules", *[str(p) for p in sorted((PROM_DIR / "rules").glob("*.yml"))])
    assert rules.returncode == 0, rules.stdout + rules.stderr
    assert "SUCCESS: 12 rules found" in rules.stdout and "SUCCESS: 8 rules found" in rules.stdout

    k8s = promtool("check", "config", "prometheus-k8s.yml")
    if "kubernetes_sd_configs not found" in k8s.stdout + k8s.stderr:
        # Debian builds Prometheus without Kubernetes discovery: check everything else of that config
        # (relabelling, rule files) with the discovery block swapped for a static one.
        config = yaml.safe_load((PROM_DIR / "prometheus-k8s.yml").read_text())
        for job in config["scrape_configs"]:
            assert job.pop("kubernetes_sd_configs") == [{"role": "pod"}]
            job["static_configs"] = [{"targets": ["pod:8000"]}]
        config["rule_files"] = [str(PROM_DIR / rule) for rule in config["rule_files"]]
        (tmp_path / "k8s.yml").write_text(yaml.safe_dump(config))
        k8s = promtool("check", "config", str(tmp_path / "k8s.yml"))
    assert k8s.returncode == 0, k8s.stdout + k8s.stderr


@needs_prometheus
def test_every_alert_passes_its_promtool_unit_tests() -> None:
    result = promtool("test", "rules", "tests/sentiment-alerts.test.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    tested = set(re.findall(r"alertname: (\w+)", (PROM_DIR / "tests" / "sentiment-alerts.test.yml").read_text()))
    alerts = {name for name, _ in rule_expressions() if not name.count(":")}
    assert alerts and alerts <= tested, f"alerts without a unit test: {alerts - tested}"


@needs_prometheus
def test_promtool_unit_tests_catch_a_broken_alert(tmp_path) -> None:
    """The unit tests are not vacuous: an SLO alert with the wrong threshold fails them."""
    for name in ("rules", "tests"):
        shutil.copytree(PROM_DIR / name, tmp_path / name)
    alerts = tmp_path / "rules" / "sentiment-alerts.yml"
    alerts.write_text(alerts.read_text().replace('route="/v1/sentiment"} > 0.05', 'route="/v1/sentiment"} > 0.5'))
    result = promtool("test", "rules", "tests/sentiment-alerts.test.yml", cwd=tmp_path)
    assert result.returncode != 0 and "SentimentLatencyP99OverSLO" in result.stdout + result.stderr


def test_the_dashboard_is_well_formed() -> None:
    dashboard = load_dashboard()
    panels = dashboard["panels"]
    assert dashboard["uid"] and dashboard["title"]
    assert len({p["id"] for p in panels}) == len(panels)
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    cells: set[tuple[int, int]] = set()
    for panel in panels:
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24 and grid["h"] > 0, panel["title"]
        mine = {(grid["x"] + i, grid["y"] + j) for i in range(grid["w"]) for j in range(grid["h"])}
        assert not cells & mine, f"{panel['title']} overlaps another panel"
        cells |= mine
        assert panel["type"] in {"timeseries", "stat", "heatmap"} and panel["targets"], panel["title"]
        assert panel["datasource"]["uid"] == "${datasource}"
        assert len({t["refId"] for t in panel["targets"]}) == len(panel["targets"])
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}" and target["expr"].strip()
    titles = " ".join(p["title"].lower() for p in panels)
    for topic in ("request rate", "latency", "queue wait", "batch size", "label and source", "confidence",
                  "fallbacks", "teacher latency", "teacher state", "aspect"):
        assert topic in titles, topic
    provisioned = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text())
    assert variables["datasource"]["current"]["value"] == provisioned["datasources"][0]["uid"]
    provider = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "sentiment.yml").read_text())
    assert provider["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards"


class Traffic:
    def __init__(self, prometheus: Prometheus, start: float, end: float, texts: int) -> None:
        self.prometheus, self.start, self.end, self.texts = prometheus, start, end, texts


@pytest.fixture(scope="module")
def traffic(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Traffic]:
    """The real service under a little of every kind of traffic, scraped by a real Prometheus with the rules."""
    if PROMETHEUS is None:
        pytest.skip("prometheus not installed (.ci/run installs it)")
    work = tmp_path_factory.mktemp("prometheus")
    with running_service(tiny_model, work, SENTIMENT_MAX_TEXTS="8") as svc, \
            running_prometheus([svc.url.removeprefix("http://")], work) as prometheus:
        prometheus.wait_for('up{job="sentiment"} == 1')
        start = time.time()
        with svc.client() as client:
            # Counters appear at their first use: let Prometheus see every series once before the traffic,
            # so that rate() has an increase to measure.
            for fallback in ("never", "always"):
                assert client.post("/v1/sentiment", json={"texts": ["ok"], "fallback": fallback}).status_code == 200
            assert client.post("/v1/sentiment/explain", json={"text": "meh"}).status_code == 503  # no teacher
            prometheus.wait_for('sentiment_fallbacks_total{outcome="disabled"}')
            for i in range(40):
                texts = ["great, thanks", "awful, nobody answers", "where is my order?"][: 1 + i % 3]
                fallback = ("never", "auto", "always")[i % 3]
                assert client.post("/v1/sentiment", json={"texts": texts, "fallback": fallback,
                                                          "aspects": i % 2 == 0}).status_code == 200
                assert client.post("/v1/sentiment", json={"texts": []}).status_code == 422
                if i % 10 == 0:
                    assert client.post("/v1/sentiment/explain", json={"text": "meh"}).status_code == 503
                    time.sleep(0.5)
        texts = 2 + sum(1 + i % 3 for i in range(40))
        prometheus.wait_for(f'sum(sentiment_predictions_total{{job="sentiment"}}) == {texts}')  # the last scrape
        prometheus.wait_for("sentiment:texts:rate5m > 0")
        prometheus.wait_for('route:sentiment_request_errors:ratio_rate5m{route="/v1/sentiment/explain"} > 0')
        yield Traffic(prometheus, start, time.time(), texts)


def test_prometheus_scrapes_every_replica_and_every_text(traffic: Traffic) -> None:
    [up] = traffic.prometheus.query('up{job="sentiment"}')
    assert up["metric"]["pod"] == "sentiment-0" and up["value"][1] == "1"
    [sample] = traffic.prometheus.query('sum by (source) (sentiment_predictions_total{job="sentiment"})')
    assert sample["metric"] == {"source": "student"} and float(sample["value"][1]) == traffic.texts


def test_every_dashboard_and_rule_expression_evaluates(traffic: Traffic) -> None:
    """No expression errors (a typo, a wrong function, a many-to-many match); the core ones have data."""
    results = {expr: traffic.prometheus.query(expr) for _, _, expr in panel_queries(load_dashboard())}
    results |= {expr: traffic.prometheus.query(expr) for _, expr in rule_expressions()}
    core = ["route:sentiment_requests:rate5m", "sentiment:texts:rate5m",
            'route:sentiment_request_duration_seconds:p99_5m{route="/v1/sentiment"}',
            "route:sentiment_request_errors:ratio_rate5m", "sentiment:batch_size:mean5m",
            "sentiment:queue_wait:share5m", "sentiment:fallbacks:ratio_rate5m", "sentiment:queue_utilisation:max",
            "sum(sentiment_ready)", "max(sentiment_teacher_breaker_state)"]
    for expr in core:
        assert expr in results, f"{expr} is in neither the dashboard nor the rules"
        assert results[expr], f"no data for {expr}"
    by_label = next(r for e, r in results.items() if e.startswith("sum by (label, source)"))
    assert by_label and {s["metric"]["label"] for s in by_label} <= {"negative", "neutral", "positive"}
    assert {s["metric"]["source"] for s in by_label} == {"student"}
    fallbacks = next(r for e, r in results.items() if e.startswith("sum by (reason, outcome)"))
    assert {s["metric"]["outcome"] for s in fallbacks} == {"disabled"}  # the service runs without a teacher
    [errors] = [s for s in results["route:sentiment_request_errors:ratio_rate5m"]
                if s["metric"]["route"] == "/v1/sentiment"]
    assert float(errors["value"][1]) == 0.0, errors  # 422s are the client's errors, not the service's
    [share] = results["sentiment:queue_wait:share5m"]
    assert 0 <= float(share["value"][1]) <= 1, share


def test_the_prometheus_adapter_rule_serves_the_hpa_metric(traffic: Traffic) -> None:
    """The adapter's query, with its template filled in as the adapter would for the HPA, returns the
    queue depth per pod."""
    config = yaml.safe_load((ROOT / "deploy" / "k8s" / "monitoring" / "prometheus-adapter-rules.yaml").read_text())
    [rule] = yaml.safe_load(config["data"]["config.yaml"])["rules"]
    assert traffic.prometheus.query(rule["seriesQuery"])
    query = (rule["metricsQuery"].replace("<<.Series>>", "sentiment_queue_depth")
             .replace("<<.LabelMatchers>>", 'namespace="local",pod=~"sentiment-0"').replace("<<.GroupBy>>", "pod"))
    [sample] = traffic.prometheus.query(query)
    assert sample["metric"] == {"pod": "sentiment-0"} and float(sample["value"][1]) == 0.0


def test_the_dashboard_picture_is_drawn_from_prometheus(traffic: Traffic, tmp_path) -> None:
    out = tmp_path / "dashboard.png"
    drawn = render(load_dashboard(), traffic.prometheus, traffic.start, traffic.end, out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert drawn >= 15
