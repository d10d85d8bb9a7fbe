"""`python -m service`: serve with the configured ASGI server (granian by default, uvicorn optional).

A broken model directory stops the start with one line naming the file, before anything binds.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import signal
import sys
from types import FrameType
from typing import Any

from service.artifact import ArtifactError, load_artifact
from service.aspects import check_aspect_config
from service.drain import DRAIN_SIGNAL, Drain
from service.lifetime import MASTER_PID_VARIABLE
from service.logs import configure_logging
from service.settings import Settings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m service", description=__doc__)
    parser.add_argument("--print-settings", action="store_true", help="print every SENTIMENT_* variable")
    args = parser.parse_args(argv)
    if args.print_settings:
        for name, default, doc in Settings.describe():
            print(f"{name:34} {default!s:28} {doc}")
        return 0
    try:
        settings = Settings.from_env()
        load_artifact(settings.model_dir, variant=settings.model_variant)
        if settings.aspects_enabled:
            check_aspect_config(settings.aspect_model_dir, settings.aspect_taxonomy)
    except (ArtifactError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level)
    if settings.server == "uvicorn":
        serve_uvicorn(settings)
    else:
        serve_granian(settings)
    return 0


def serve_uvicorn(settings: Settings) -> None:
    """uvicorn in this process: the drain signal goes to this process's own event loop."""
    import uvicorn

    class DrainingServer(uvicorn.Server):
        def handle_exit(self, sig: int, frame: FrameType | None) -> None:
            drain.on_signal(sig)

    config = uvicorn.Config("service.app:app_from_env", factory=True, host=settings.host, port=settings.port,
                            log_config=None, access_log=False, lifespan="on", timeout_graceful_shutdown=10)
    server = DrainingServer(config)
    drain = Drain(settings.drain_delay_s, notify=lambda: os.kill(os.getpid(), DRAIN_SIGNAL),
                  stop=lambda sig: uvicorn.Server.handle_exit(server, sig, None))
    server.run()


def serve_granian(settings: Settings) -> None:
    """granian's master here, one worker process: the drain signal goes to the worker."""
    from granian.constants import Interfaces, Loops
    from granian.log import LogLevels
    from granian.server import Server

    class DrainingServer(Server):
        def signal_handler_interrupt(self, signum: int = signal.SIGINT, *args: Any, **kwargs: Any) -> None:
            drain.on_signal(signum)

    os.environ[MASTER_PID_VARIABLE] = str(os.getpid())  # the worker exits if this process dies
    # uvloop by name: granian's `auto` prefers its own rloop whenever that is installed, and rloop 0.5
    # served 5% less at 64 clients with a 40% higher p99 (bench/serving.py, 3 interleaved rounds).
    loop = Loops.uvloop if importlib.util.find_spec("uvloop") else Loops.asyncio
    # A bound on every worker stop: granian 2.8's worker can deadlock in its own signal handler when the
    # worker and the master are signalled at once (Ctrl-C reaches the whole process group; 4 hangs in 40
    # tries here), and without a kill timeout the master then waits for it forever. Its maintainers advise
    # setting one in production (emmett-framework/granian#875).
    server = DrainingServer("service.app:app_from_env", factory=True, address=settings.host, port=settings.port,
                            interface=Interfaces.ASGI, workers=1, loop=loop, log_enabled=True,
                            log_level=LogLevels.warning, log_access=False,
                            workers_kill_timeout=settings.worker_stop_timeout_s)
    drain = Drain(settings.drain_delay_s, notify=lambda: [os.kill(w._id(), DRAIN_SIGNAL) for w in server.wrks],
                  stop=lambda _: Server.signal_handler_interrupt(server))
    server.serve()


if __name__ == "__main__":
    sys.exit(main())
