"""What the benchmarks and load tests share: starting the real service (`python -m service`) on a free
port, waiting for a server to answer, and reading a percentile."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
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

    def answered(response: httpx.Response) -> bool:
        state = response.json().get("details", {}).get("teacher_state") if teacher else "ready"
        return response.status_code == 200 and state in ("ready", "external", "disabled")

    wait_ready(process, f"{url}/health/{probe}", wait, answered, tail=lambda: log.read_text()[-3000:] if log else "")
    return process, url


def wait_ready(process: subprocess.Popen[bytes], probe_url: str, wait: float,
               answered: Callable[[httpx.Response], bool] = lambda r: r.status_code == 200,
               tail: Callable[[], str] = lambda: "") -> None:
    """Poll `probe_url` until `answered`; RuntimeError (with the log's `tail`) if the process exits or the
    time runs out, and then the process is killed. One client for every poll: `httpx.get` builds a new
    client, TLS context included, each call (43 ms of CPU here), and polling with it every 50 ms took
    ~half a core from the service while it calibrated (its measured texts/s 30% below a quiet start's)."""
    until = time.monotonic() + wait
    with httpx.Client(timeout=1) as client:
        while time.monotonic() < until:
            if process.poll() is not None:
                raise RuntimeError(f"{probe_url}: process exited with code {process.returncode}\n{tail()}")
            try:
                if answered(client.get(probe_url)):
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
    process.kill()
    process.wait()
    raise RuntimeError(f"{probe_url} did not answer in {wait:.0f} s\n{tail()}")


def percentile(values: list[float], q: float) -> float:
    """The q-quantile by rank (nan for no values)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def process_tree(root: int) -> list[int]:
    """`root` and every process below it (Linux /proc)."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parents[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
    tree, frontier = [root], [root]
    while frontier:
        parent = frontier.pop()
        children = [pid for pid, ppid in parents.items() if ppid == parent]
        tree += children
        frontier += children
    return tree
