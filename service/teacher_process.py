"""The embedded teacher: llama.cpp's OpenAI-compatible server as a supervised child process.

Started on a free loopback port when no SENTIMENT_TEACHER_URL is set. It counts as ready only after
it has answered a completion with logprobs (the call the fallback makes; a llama.cpp built for the
wrong CPU dies exactly there). The supervisor restarts it when it dies or hangs, backing off while it
keeps crashing, and reports every change through `on_change`. The child gets only the environment
it needs (llama-cpp-python's server reads PORT, HOST, MODEL, ... from it over its arguments) and is
killed by the kernel if its owner dies. `python -m service.teacher_process` runs it standalone.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger("sentiment.teacher")
EMBEDDED_MODEL_NAME = "smollm2-135m-instruct"
STARTING, READY, DOWN, STOPPED = "starting", "ready", "down", "stopped"
# The only variables the child inherits: enough to run Python, nothing the server reads as a setting.
CHILD_ENV = ("PATH", "HOME", "USER", "LANG", "LC_ALL", "LC_CTYPE", "TMPDIR", "TZ", "LD_LIBRARY_PATH", "PYTHONPATH")
# Runs in the child before the server: die with the owner, also if it is already gone.
_CHILD_MAIN = (
    "import runpy, sys\n"
    "from service.lifetime import exit_with_parent\n"
    "exit_with_parent(int(sys.argv[1]))\n"
    "sys.argv = ['llama_cpp.server', *sys.argv[2:]]\n"
    "runpy.run_module('llama_cpp.server', run_name='__main__', alter_sys=True)\n"
)


class TeacherStartError(RuntimeError):
    """The server exited or did not answer a logprob completion in time; the message says which."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def default_gguf() -> Path:
    """SmolLM2's GGUF, fetched by `make serve`'s set-up (else here, on first use)."""
    from distill.data import DataError, teacher_gguf

    try:
        return teacher_gguf()
    except DataError as exc:
        raise TeacherStartError(str(exc)) from None


def describe_exit(returncode: int) -> str:
    """'signal SIGILL' for a kill by signal (negative code), else 'exit code N'."""
    if returncode < 0:
        with contextlib.suppress(ValueError):
            return f"signal {signal.Signals(-returncode).name}"
        return f"signal {-returncode}"
    return f"exit code {returncode}"


class EmbeddedTeacher:
    """Owns one llama_cpp.server process; `url` is its OpenAI-compatible base URL."""

    def __init__(self, gguf: Path | None = None, port: int | None = None, threads: int = 2,
                 model_name: str = EMBEDDED_MODEL_NAME,
                 on_change: Callable[[EmbeddedTeacher], None] | None = None) -> None:
        self.gguf = gguf
        self.port = port or free_port()
        self.threads = threads
        self.model_name = model_name
        self.on_change = on_change
        self.process: subprocess.Popen[bytes] | None = None
        self.state = STOPPED
        self.restarts = 0  # starts after the first one
        self.starts = 0
        self.last_exit: str | None = None  # why the last process ended ('signal SIGILL', 'not answering', ...)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def status(self) -> dict[str, object]:
        return {"state": self.state, "restarts": self.restarts, "last_exit": self.last_exit}

    def _set(self, state: str) -> None:
        if state != self.state:
            self.state = state
            if self.on_change:
                self.on_change(self)

    def spawn(self) -> None:
        """Start the server process (fast; readiness is `astart`'s job)."""
        self.gguf = self.gguf or default_gguf()
        if not self.gguf.is_file():
            raise TeacherStartError(f"{self.gguf}: teacher model file not found")
        args = ["--model", str(self.gguf), "--model_alias", self.model_name, "--host", "127.0.0.1",
                "--port", str(self.port), "--n_threads", str(self.threads), "--n_ctx", "1024",
                "--logits_all", "true"]
        env = {key: os.environ[key] for key in CHILD_ENV if key in os.environ}
        if self.starts:
            self.restarts += 1
        self.starts += 1
        self._set(STARTING)
        self.process = subprocess.Popen([sys.executable, "-c", _CHILD_MAIN, str(os.getpid()), *args], env=env,
                                        cwd=tempfile.gettempdir(), stdin=subprocess.DEVNULL,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                        start_new_session=True)

    async def astart(self, wait: float = 60.0) -> None:
        """Spawn the server and return once it answers a logprob completion; TeacherStartError if not."""
        await asyncio.to_thread(self.stop)
        try:
            if self.gguf is None:
                self.gguf = await asyncio.to_thread(default_gguf)
            self.spawn()
        except TeacherStartError as exc:
            await self._gone(str(exc))
            raise
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if not self.alive():
                await self._gone(describe_exit(self.process.returncode if self.process else 0))
                raise TeacherStartError(f"teacher server died while starting: {self.last_exit}")
            if await asyncio.to_thread(self.answers_logprobs):
                self._set(READY)
                log.info("teacher ready", extra={"port": self.port, "restarts": self.restarts})
                return
            await asyncio.sleep(0.2)
        await self._gone(f"not ready within {wait:.0f}s")
        raise TeacherStartError(f"teacher server {self.last_exit}")

    def start(self, wait: float = 60.0) -> None:
        """`astart` for callers without an event loop (tests, benchmarks, the standalone command)."""
        asyncio.run(self.astart(wait))

    def answers_logprobs(self) -> bool:
        """The readiness check: a one-token completion with logprobs, the call the fallback makes."""
        body = json.dumps({"model": self.model_name, "prompt": "Message: thanks!\nSentiment:", "max_tokens": 1,
                           "temperature": 0.0, "logprobs": 2}).encode()
        request = urllib.request.Request(f"{self.url}/v1/completions", data=body,
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=10.0) as response:
                choice = json.loads(response.read())["choices"][0]
                return bool(choice["logprobs"]["top_logprobs"])
        except (OSError, ValueError, KeyError, IndexError, TypeError):
            return False

    def responds(self) -> bool:
        """The cheap liveness check between completions."""
        try:
            with urllib.request.urlopen(f"{self.url}/v1/models", timeout=2.0) as response:
                return response.status == 200
        except OSError:
            return False

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self) -> None:
        """Terminate the server's process group (SIGKILL after 5 s); idempotent."""
        if self.process and self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self.process = None
        if self.state != DOWN:
            self.state = STOPPED  # an owner's stop: no news to report

    async def _gone(self, why: str) -> None:
        """One log line naming the cause (an exit signal, a hang), then the process group is ended."""
        self.last_exit = why
        log.error("teacher down", extra={"cause": why, "restarts": self.restarts})
        self._set(DOWN)
        await asyncio.to_thread(self.stop)

    async def supervise(self, interval: float = 2.0, misses_allowed: int = 3, max_backoff: float = 60.0) -> None:
        """Keep a teacher running until cancelled: start it, check it every `interval`, restart it when it
        has died or missed `misses_allowed` checks. A start that fails waits 1, 2, 4 ... `max_backoff` s
        before the next, so a teacher that cannot run on this machine costs one log line a minute."""
        backoff = 1.0
        try:
            while True:
                if self.state != READY:
                    try:
                        await self.astart()
                        backoff = 1.0
                    except TeacherStartError:
                        await asyncio.sleep(backoff)
                        backoff = min(2 * backoff, max_backoff)
                    continue
                misses = 0
                while misses < misses_allowed:
                    await asyncio.sleep(interval)
                    if not self.alive():
                        break
                    misses = 0 if await asyncio.to_thread(self.responds) else misses + 1
                code = self.process.poll() if self.process else None
                await self._gone(describe_exit(code) if code is not None else f"not answering for {misses} checks")
        finally:
            await asyncio.to_thread(self.stop)


async def _run_standalone(port: int) -> None:
    teacher = EmbeddedTeacher(port=port, on_change=lambda t: print(f"teacher {t.state} at {t.url}", flush=True))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        loop.add_signal_handler(sig, stop.set)
    supervisor = asyncio.create_task(teacher.supervise())
    await stop.wait()
    supervisor.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await supervisor


def main() -> None:
    """Run the embedded teacher in the foreground on SENTIMENT_TEACHER_PORT (default 8081) until a signal."""
    logging.basicConfig(level=logging.INFO)
    asyncio.run(_run_standalone(int(os.environ.get("SENTIMENT_TEACHER_PORT", "8081"))))


if __name__ == "__main__":
    main()
