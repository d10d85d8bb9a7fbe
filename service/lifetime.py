"""No process of this project outlives its owner: Linux's parent-death signal, set by the child itself.

Used by the ASGI server's worker (granian forks one; if its master is SIGKILLed, the worker and its
teacher would otherwise serve on as orphans) and by the embedded teacher's child process.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1
MASTER_PID_VARIABLE = "_SENTIMENT_MASTER_PID"  # set by `python -m service` for granian's worker process


def exit_with_parent(parent_pid: int, sig: signal.Signals = signal.SIGTERM) -> None:
    """Ask the kernel for `sig` when the parent dies; send it now if the parent is already gone."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(sig))
    if os.getppid() != parent_pid:
        os.kill(os.getpid(), sig)


def is_server_worker() -> bool:
    """This process is the worker that `python -m service` forked for granian (not the master, not uvicorn)."""
    master = os.environ.get(MASTER_PID_VARIABLE)
    return bool(master) and int(master) != os.getpid()
