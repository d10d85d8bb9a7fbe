"""Start the real service (`python -m service`) on a free port for benchmarks and load tests."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx

from service.settings import DEFAULT_MODEL_DIR
from service.teacher_process import free_port

ROOT = Path(__file__).resolve().parent.parent


def start_service(env: dict[str, str], wait: float = 90.0, log: Path | None = None,
                  probe: str = "ready", teacher: bool = False) -> tuple[subprocess.Popen[bytes], str]:
    """The service with `env` on top of the caller's environment; returns once /health/{probe} is 200,
    and with `teacher` once the embedded teacher (started in the background) answers too.

    Output goes to `log` when given (tests show it on failure), else nowhere.
    """
    port = free_port()
    settings = {"PYTHONPATH": str(ROOT), "SENTIMENT_PORT": str(port), "SENTIMENT_LOG_LEVEL": "WARNING",
                "SENTIMENT_MODEL_DIR": os.environ.get("SENTIMENT_MODEL_DIR", str(DEFAULT_MODEL_DIR)), **env}
    with log.open("wb") if log else open(os.devnull, "wb") as out:
        process = subprocess.Popen([sys.executable, "-m", "service"], cwd=ROOT, env={**os.environ, **settings},
                                   stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    tail = lambda: log.read_text()[-3000:] if log else ""  # noqa: E731
    until = time.monotonic() + wait
    while time.monotonic() < until:
        if process.poll() is not None:
            raise RuntimeError(f"service exited with code {process.returncode}\n{tail()}")
        try:
            response = httpx.get(f"{url}/health/{probe}", timeout=1)
            state = response.json().get("details", {}).get("teacher_state") if teacher else "ready"
            if response.status_code == 200 and state in ("ready", "external", "disabled"):
                return process, url
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    process.kill()
    raise RuntimeError(f"service did not become {probe}\n{tail()}")
