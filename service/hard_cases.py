"""The hard-case log: texts the teacher answered, appended as JSONL for the next distillation round.

Opt-in (it stores customer text): written off the event loop by one writer thread, file mode 0600,
rotated to `<path>.1` past `max_bytes`. A failing disk costs a metric and a log line a minute, never
a request: `record` returns at once, and drops (and counts) entries while too many are waiting.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from service.metrics import Metrics

log = logging.getLogger("sentiment.hard_cases")
MAX_WAITING = 256


def rotated(path: Path) -> Path:
    return path.with_name(path.name + ".1")


class HardCaseLog:
    def __init__(self, path: Path, max_bytes: int, metrics: Metrics) -> None:
        self.path, self.max_bytes, self._metrics = path, max_bytes, metrics
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hard-cases")
        self._waiting: set[asyncio.Future[None]] = set()
        self._last_warning = 0.0

    def record(self, entry: dict[str, Any]) -> None:
        """Queue one entry for the writer thread; never blocks, never raises."""
        if len(self._waiting) >= MAX_WAITING:
            self._failed("backlog")
            return
        line = (json.dumps(entry, ensure_ascii=False) + "\n").encode("utf-8")
        future = asyncio.get_running_loop().run_in_executor(self._writer, self._append, line)
        self._waiting.add(future)
        future.add_done_callback(self._done)

    def _done(self, future: asyncio.Future[None]) -> None:
        self._waiting.discard(future)
        if future.cancelled():
            return
        if isinstance(future.exception(), OSError):
            self._failed("disk")
        else:
            self._metrics.hard_cases.labels("written").inc()

    def _failed(self, reason: str) -> None:
        self._metrics.hard_cases.labels(reason).inc()
        if time.monotonic() - self._last_warning > 60:
            self._last_warning = time.monotonic()
            log.warning("hard case not written", extra={"reason": reason, "path": str(self.path)})

    def _append(self, line: bytes) -> None:
        """Writer thread: rotate past the size cap, then append with mode 0600."""
        try:
            size = self.path.stat().st_size
        except FileNotFoundError:
            size = 0
        if size and size + len(line) > self.max_bytes:
            os.replace(self.path, rotated(self.path))
        self.path.parent.mkdir(parents=True, exist_ok=True)
        descriptor = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        with os.fdopen(descriptor, "ab") as handle:
            handle.write(line)

    async def aclose(self) -> None:
        """Finish what is queued (shutdown)."""
        await asyncio.gather(*self._waiting, return_exceptions=True)
        self._writer.shutdown(wait=False)
