"""The Locust load test itself runs against the real service (a short smoke run; figures come from make loadtest)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from loadtests.run import run_locust
from service.teacher_process import free_port
from tests.conftest import ROOT, running_service


def test_locust_drives_the_service_without_failures(tiny_model, tmp_path) -> None:
    with running_service(tiny_model, tmp_path) as svc:
        figures = run_locust(svc.url, users=4, seconds=3)
    assert figures["failures"] == 0
    assert figures["requests_per_s"] > 0 and figures["p50_ms"] > 0
    assert figures["p50_ms"] <= figures["p95_ms"] <= figures["p99_ms"]


def run_steps(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(ROOT / "loadtests" / "run.py"), "steps", *args], capture_output=True,
                          text=True, timeout=300, cwd=ROOT)


def plan(path: Path, p99_ms: float) -> Path:
    path.write_text("step_seconds = 4\nsettle_seconds = 1\nthink_seconds = 0.05\n" + "".join(
        f"[[steps]]\nusers = {users}\np99_ms = {p99_ms}\nmax_error_ratio = 0.0\n" for users in (1, 3)))
    return path


def test_step_load_reports_every_step_and_exits_by_its_gates(tiny_model, tmp_path) -> None:
    with running_service(tiny_model, tmp_path) as svc:
        passed = run_steps("--url", svc.url, "--slo", str(plan(tmp_path / "loose.toml", 60_000)),
                           "--out", str(tmp_path / "loose"))
        failed = run_steps("--url", svc.url, "--slo", str(plan(tmp_path / "strict.toml", 0)),
                           "--out", str(tmp_path / "strict"))
    assert passed.returncode == 0, passed.stdout + passed.stderr
    assert "gates: all 4 passed" in passed.stdout
    steps = json.loads((tmp_path / "loose" / "steps.json").read_text())
    assert [s["users"] for s in steps] == [1, 3]
    assert all(s["requests"] > 0 and s["failures"] == 0 and s["p50_ms"] <= s["p99_ms"] for s in steps)
    assert (tmp_path / "loose" / "chart.png").read_bytes()[:4] == b"\x89PNG"
    assert "locust" in (tmp_path / "loose" / "report.html").read_text().lower()
    assert "Request Count" in (tmp_path / "loose" / "locust_stats.csv").read_text().splitlines()[0]
    assert (tmp_path / "loose" / "locust_stats_history.csv").exists()
    assert failed.returncode == 1, failed.stdout + failed.stderr
    assert "gates: FAILED" in failed.stdout and "1 users: p99" in failed.stdout and "3 users: p99" in failed.stdout


def test_a_plan_that_cannot_run_is_refused_before_any_load(tmp_path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("step_seconds = 5\n[[steps]]\nusers = 0\n")
    result = run_steps("--url", "http://127.0.0.1:9", "--slo", str(bad))
    assert result.returncode == 2 and "step 1: users must be an integer >= 1" in result.stderr


def test_no_running_service_is_a_clear_error(tmp_path) -> None:
    result = run_steps("--url", f"http://127.0.0.1:{free_port()}", "--slo", str(plan(tmp_path / "p.toml", 50)))
    assert result.returncode == 2 and "make serve" in result.stderr
