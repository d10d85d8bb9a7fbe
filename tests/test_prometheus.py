"""A real Prometheus (Debian's package) scrapes the service and sees its metrics."""

from __future__ import annotations

import shutil
import subprocess
import time

import httpx
import pytest

from service.teacher_process import free_port
from tests.conftest import running_service

PROMETHEUS = shutil.which("prometheus")


@pytest.mark.skipif(PROMETHEUS is None, reason="prometheus binary not installed (.ci/run installs it)")
def test_prometheus_scrapes_the_service(tiny_model, tmp_path) -> None:
    with running_service(tiny_model, tmp_path) as svc:
        target = svc.url.removeprefix("http://")
        config = tmp_path / "prometheus.yml"
        config.write_text(f"""global:
  scrape_interval: 1s
scrape_configs:
  - job_name: sentiment
    static_configs:
      - targets: ["{target}"]
""")
        port = free_port()
        prometheus = subprocess.Popen(
            [PROMETHEUS, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{port}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            with svc.client() as client:
                assert client.post("/v1/sentiment", json={"texts": ["great", "awful"]}).status_code == 200
            query = 'sum(sentiment_predictions_total{job="sentiment"})'
            deadline, value = time.monotonic() + 60, None
            while time.monotonic() < deadline:
                try:
                    data = httpx.get(f"http://127.0.0.1:{port}/api/v1/query", params={"query": query}, timeout=2).json()
                    if data["data"]["result"]:
                        value = float(data["data"]["result"][0]["value"][1])
                        break
                except (httpx.HTTPError, KeyError, ValueError):
                    pass
                time.sleep(0.5)
            assert value == 2.0
            up = httpx.get(f"http://127.0.0.1:{port}/api/v1/query", params={"query": 'up{job="sentiment"}'}).json()
            assert up["data"]["result"][0]["value"][1] == "1"
            buckets = httpx.get(f"http://127.0.0.1:{port}/api/v1/query", params={
                "query": "histogram_quantile(0.99, sum by (le) (sentiment_request_duration_seconds_bucket))"}).json()
            assert buckets["status"] == "success"
        finally:
            prometheus.terminate()
            prometheus.wait(timeout=10)
