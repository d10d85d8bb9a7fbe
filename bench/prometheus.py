"""A real Prometheus (the distribution's binary) with the project's rules, for tests and the dashboard
picture: it scrapes the given targets every second and evaluates deploy/prometheus/rules every second."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import yaml

from bench.launch import wait_ready
from service.teacher_process import free_port

ROOT = Path(__file__).resolve().parent.parent
RULES = sorted((ROOT / "deploy" / "prometheus" / "rules").glob("*.yml"))
PROMETHEUS = shutil.which("prometheus")


class PromQLError(RuntimeError):
    """Prometheus refused or failed to evaluate an expression; the message is its own."""


class Prometheus:
    def __init__(self, url: str) -> None:
        self.url = url

    def _get(self, path: str, params: dict[str, Any]) -> Any:
        body = httpx.get(f"{self.url}{path}", params=params, timeout=10).json()
        if body.get("status") != "success":
            raise PromQLError(f"{params.get('query')}: {body.get('errorType')}: {body.get('error')}")
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        """The instant vector (or scalar as a one-element list) `expr` has now."""
        data = self._get("/api/v1/query", {"query": expr})
        return data["result"] if data["resultType"] in ("vector", "matrix") else [{"metric": {},
                                                                                  "value": data["result"]}]

    def query_range(self, expr: str, start: float, end: float, step: float) -> list[dict[str, Any]]:
        return self._get("/api/v1/query_range", {"query": expr, "start": start, "end": end, "step": step})["result"]

    def wait_for(self, expr: str, timeout: float = 60.0) -> list[dict[str, Any]]:
        """Poll until `expr` returns data (scrapes and rule evaluations take a few seconds)."""
        deadline = time.monotonic() + timeout
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if result := self.query(expr):
                    return result
            if time.monotonic() > deadline:
                raise TimeoutError(f"no data for {expr} after {timeout:.0f} s")
            time.sleep(0.5)


@contextlib.contextmanager
def running_prometheus(targets: list[str], workdir: Path, job: str = "sentiment",
                       rules: list[Path] = RULES) -> Iterator[Prometheus]:
    """Prometheus scraping `targets` as `job` (with namespace and pod labels, as in Kubernetes)."""
    if PROMETHEUS is None:
        raise RuntimeError("no prometheus binary on PATH (apt-get install prometheus)")
    config = {"global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
              "rule_files": [str(rule) for rule in rules],
              "scrape_configs": [{"job_name": job, "static_configs": [
                  {"targets": [target], "labels": {"namespace": "local", "pod": f"{job}-{i}"}}
                  for i, target in enumerate(targets)]}]}
    (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    with (workdir / "prometheus.log").open("wb") as log:
        process = subprocess.Popen([PROMETHEUS, f"--config.file={workdir / 'prometheus.yml'}",
                                    f"--storage.tsdb.path={workdir / 'tsdb'}",
                                    f"--web.listen-address=127.0.0.1:{port}"], stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(process, f"{url}/-/ready", 30, tail=lambda: (workdir / "prometheus.log").read_text()[-2000:])
        yield Prometheus(url)
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
