"""Graceful drain. On SIGTERM the service first reports not ready (`/health/ready` 503, `draining`) while
it keeps serving, so load balancers stop sending; after SENTIMENT_DRAIN_DELAY_S it stops accepting,
finishes what is in flight and queued, stops the embedded teacher and exits. SIGINT (Ctrl-C), or a
second signal, skips the wait.

The ASGI server's master process receives the signal; it tells its worker with DRAIN_SIGNAL, which the
app handles on its event loop (`install_drain_handler`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import threading
from collections.abc import Callable

from service.lifetime import is_server_worker

log = logging.getLogger("sentiment.drain")
DRAIN_SIGNAL = signal.SIGUSR1


class Drain:
    """The master's side: the first SIGTERM notifies the workers, then stops the server after `delay`."""

    def __init__(self, delay: float, notify: Callable[[], None], stop: Callable[[int], None]) -> None:
        self.delay, self._notify, self._stop = delay, notify, stop
        self._timer: threading.Timer | None = None

    def on_signal(self, signum: int) -> None:
        """Any signal after the first, SIGINT, or no delay: stop now. The first SIGTERM: drain, then stop."""
        if self._timer is not None or signum != signal.SIGTERM or self.delay <= 0:
            if self._timer is not None:
                self._timer.cancel()
            self._stop(signum)
            return
        log.info("draining", extra={"delay_s": self.delay})
        self._notify()
        self._timer = threading.Timer(self.delay, self._stop, args=(signum,))
        self._timer.daemon = True
        self._timer.start()


def install_drain_handler(on_drain: Callable[[], None]) -> None:
    """The worker's side: DRAIN_SIGNAL calls `on_drain` on the running loop (where signals can be had).

    A worker forked by granian also ignores SIGINT: Ctrl-C reaches the whole process group, the master
    then stops the worker with SIGTERM, and granian 2.8's worker could deadlock in its own signal handler
    when both arrived at once (4 hangs in 40 tries here, the master waiting for it forever)."""
    with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(DRAIN_SIGNAL, on_drain)
        if is_server_worker():
            loop.remove_signal_handler(signal.SIGINT)
            signal.signal(signal.SIGINT, signal.SIG_IGN)
