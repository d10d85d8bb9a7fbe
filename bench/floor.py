"""The floor one client sees on this machine: a bare ASGI app (no Litestar, no model) on granian and on
uvicorn, answering after `work` ms of busy CPU, done inline on the event loop or handed to a thread and
back (as the service hands a text to a stream). Whatever a row takes beyond its work is what the
server, the hand-off and the machine cost one request, before any of the service's own code runs.

  python bench/floor.py [--work-ms 0 6] [--rounds 5] [--seconds 3]

Why it exists: the one-client target (the service's p50 within 1 ms of the model's lone text) depends on
how fast this machine wakes a thread that went idle during the work. On a VM whose idle vCPUs halt, that
wake is far slower after 6 ms of work than after none, and this prints how much.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.launch import ROOT, wait_ready
from bench.serving import WRK, cpu_header, load, wrk_load
from service.teacher_process import free_port

ANSWER = b'{"model":{"name":"floor","version":"0"},"results":[{"label":"positive","score":0.9}]}'
HEADERS = [(b"content-type", b"application/json"), (b"content-length", str(len(ANSWER)).encode())]
WORKER = ThreadPoolExecutor(1, thread_name_prefix="floor")  # one waiting thread, as a stream waits for work


def busy(seconds: float) -> None:
    """CPU work standing in for inference (a sleep would let the core idle, which inference does not)."""
    until = time.perf_counter() + seconds
    while time.perf_counter() < until:
        pass


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """Reads the body, works FLOOR_WORK_MS (on a thread with FLOOR_HANDOFF=1), answers a fixed body."""
    if scope["type"] == "lifespan":
        while (await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return
    while (await receive()).get("more_body"):
        pass
    work = float(os.environ.get("FLOOR_WORK_MS", "0")) / 1000
    if os.environ.get("FLOOR_HANDOFF") == "1":
        loop = asyncio.get_running_loop()
        done = loop.create_future()

        def run() -> None:
            busy(work)
            loop.call_soon_threadsafe(done.set_result, None)

        WORKER.submit(run)
        await done
    else:
        busy(work)
    await send({"type": "http.response.start", "status": 200, "headers": HEADERS})
    await send({"type": "http.response.body", "body": ANSWER})


def start(server: str, work_ms: float, handoff: bool) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    command = {"granian": ["-m", "granian", "--interface", "asgi", "--loop", "uvloop", "--workers", "1",
                           "--log-level", "warning", "--port", str(port), "bench.floor:app"],
               "uvicorn": ["-m", "uvicorn", "--loop", "uvloop", "--http", "httptools", "--log-level", "warning",
                           "--lifespan", "on", "--port", str(port), "bench.floor:app"]}[server]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "FLOOR_WORK_MS": str(work_ms), "FLOOR_HANDOFF": str(int(handoff))}
    process = subprocess.Popen([sys.executable, *command], cwd=ROOT, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    wait_ready(process, url, 60, lambda response: response.status_code == 200)
    return process, url


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work-ms", nargs="+", type=float, default=[0.0, 6.0])
    parser.add_argument("--servers", nargs="+", default=["granian", "uvicorn"], choices=["granian", "uvicorn"])
    parser.add_argument("--rounds", type=int, default=5, help="interleaved; medians")
    parser.add_argument("--seconds", type=float, default=3.0, help="per measurement")
    parser.add_argument("--loader", choices=["wrk", "python"], default="wrk" if WRK else "python")
    args = parser.parse_args()
    rows = [(server, handoff, work) for server in args.servers for handoff in (False, True) for work in args.work_ms]
    servers = {}
    p50s: dict[tuple[str, bool, float], list[float]] = {row: [] for row in rows}
    try:
        for server, handoff, work in rows:
            servers[server, handoff, work] = start(server, work, handoff)
        for i in range(args.rounds):
            for row in rows if i % 2 == 0 else rows[::-1]:
                url = servers[row][1]
                figures = (wrk_load(url, 1, args.seconds) if args.loader == "wrk"
                           else asyncio.run(load(url, 1, args.seconds)))
                if figures["errors"]:
                    raise RuntimeError(f"{row}: {figures['errors']} requests failed")
                p50s[row].append(figures["p50_ms"])
    finally:
        for process, _ in servers.values():
            process.terminate()
            process.wait()
    print(f"{time.strftime('%Y-%m-%d')}, {cpu_header()}; one client from {args.loader}, "
          f"medians of {args.rounds} interleaved rounds")
    print(f"{'server':8} {'work':>8} {'where':8} {'p50 ms':>8} {'beyond the work':>16}")
    for (server, handoff, work), values in p50s.items():
        p50 = statistics.median(values)
        print(f"{server:8} {work:6.1f}ms {'thread' if handoff else 'inline':8} {p50:8.3f} {p50 - work:13.3f} ms")


if __name__ == "__main__":
    main()
