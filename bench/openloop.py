"""The compiled open-loop load generator (bench/openloop.c), built on first use with the system's C
compiler and portable flags (-O2, no -march), and run against a URL.

  from bench.openloop import open_loop
  results = open_loop("http://127.0.0.1:8000", rate=300, seconds=60)  # [(due_s, latency_s, status)]
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

import orjson

ROOT = Path(__file__).resolve().parent.parent
SOURCE = Path(__file__).with_suffix(".c")
BINARY = ROOT / ".cache" / "openloop" / "openloop"


def build() -> Path:
    """The binary, compiled again whenever the source is newer; a missing compiler is a clear error."""
    if BINARY.exists() and BINARY.stat().st_mtime >= SOURCE.stat().st_mtime:
        return BINARY
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise RuntimeError("bench/openloop.c needs a C compiler (cc or gcc) on PATH")
    BINARY.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([compiler, "-O2", "-Wall", "-o", str(BINARY), str(SOURCE)], check=True)
    return BINARY


def open_loop(url: str, rate: float, seconds: float, texts: list[str], connections: int = 128,
              path: str = "/v1/sentiment") -> list[tuple[float, float, int]]:
    """Requests `{"text": …}` every 1/rate s for `seconds`; (scheduled time, latency from it, HTTP status;
    0 when no answer came) for each, in schedule order."""
    host, port = url.removeprefix("http://").rstrip("/").split(":")
    with tempfile.NamedTemporaryFile("wb", suffix=".jsonl") as bodies:
        bodies.write(b"\n".join(orjson.dumps({"text": text}) for text in texts) + b"\n")
        bodies.flush()
        result = subprocess.run([str(build()), host, port, path, bodies.name, str(rate), str(seconds),
                                 str(connections)], capture_output=True, text=True, check=True)
    return [(int(due) / 1e6, int(latency) / 1e6, int(status))
            for due, latency, status in (line.split() for line in result.stdout.splitlines())]
