"""The Locust load test itself runs against the real service (a short smoke run; figures come from make loadtest)."""

from __future__ import annotations

from loadtests.run import run_locust
from tests.conftest import running_service


def test_locust_drives_the_service_without_failures(tiny_model, tmp_path) -> None:
    with running_service(tiny_model, tmp_path) as svc:
        figures = run_locust(svc.url, users=4, seconds=3)
    assert figures["failures"] == 0
    assert figures["requests_per_s"] > 0 and figures["p50_ms"] > 0
    assert figures["p50_ms"] <= figures["p95_ms"] <= figures["p99_ms"]
