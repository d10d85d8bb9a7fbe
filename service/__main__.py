"""`python -m service`: serve with the configured ASGI server (granian by default, uvicorn optional).

A broken model directory stops the start with one line naming the file, before anything binds.
"""

from __future__ import annotations

import argparse
import os
import sys

from service.artifact import ArtifactError, load_artifact
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
        load_artifact(settings.model_dir)
    except (ArtifactError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level)
    if settings.server == "uvicorn":
        import uvicorn

        uvicorn.run("service.app:app_from_env", factory=True, host=settings.host, port=settings.port,
                    log_config=None, access_log=False, lifespan="on", timeout_graceful_shutdown=10)
    else:
        from granian.constants import Interfaces, Loops
        from granian.log import LogLevels
        from granian.server import Server

        os.environ[MASTER_PID_VARIABLE] = str(os.getpid())  # the worker exits if this process dies
        Server("service.app:app_from_env", factory=True, address=settings.host, port=settings.port,
               interface=Interfaces.ASGI, workers=1, loop=Loops.auto, log_enabled=True,
               log_level=LogLevels.warning, log_access=False).serve()
    return 0


if __name__ == "__main__":
    sys.exit(main())
