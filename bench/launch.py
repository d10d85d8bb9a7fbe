"""Start the real service (`python -m service`) on a free port for benchmarks and load tests."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx

from service.settings import DEFAULT_MODEL_DIR
from service.teacher_server import free_port

ROOT = Path(__file__).resolve().parent.parent


def start_service(env: dict[str, str], wait: float = 90.0) -> tuple[subprocess.Popen[bytes], str]:
    """The service with `env` on top of the caller's environment; returns once /health/ready is 200."""
    port = free_port()
    settings = {"PYTHONPATH": str(ROOT), "SENTIMENT_PORT": str(port), "SENTIMENT_LOG_LEVEL": "WARNING",
                "SENTIMENT_MODEL_DIR": os.environ.get("SENTIMENT_MODEL_DIR", str(DEFAULT_MODEL_DIR)), **env}
    process = subprocess.Popen([sys.executable, "-m", "service"], cwd=ROOT, env={**os.environ, **settings},
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    until = time.monotonic() + wait
    while time.monotonic() < until:
        if process.poll() is not None:
            raise RuntimeError(f"service exited with code {process.returncode}")
        try:
            if httpx.get(f"{url}/health/ready", timeout=1).status_code == 200:
                return process, url
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    process.kill()
    raise RuntimeError("service did not become ready")
