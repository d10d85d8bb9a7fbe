"""Graceful drain under load: SIGTERM turns readiness 503 first, requests sent during the drain delay and
those in flight when the server stops are all answered, later connections are refused cleanly, and the
service and its teacher are gone in time.

Clients stop just before the server stops accepting, as a load balancer that has seen readiness 503
does: a connection still in the kernel's accept backlog when the listener closes is reset, and no
server can answer it (README, Reload and drain)."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest

from bench.launch import process_tree
from tests.conftest import running_service
from tests.test_teacher import cmdline, gone

DELAY_S = 2.0


async def load(url: str, clients: int, until: float, log: list[tuple[float, str]]) -> None:
    """`clients` loops of POSTs (big requests, so some are in flight when the server stops) until the
    monotonic time `until`, as a load balancer still sending while it notices readiness; every outcome logged."""
    texts = [f"order {i} arrived late and the box was damaged, support never answered" for i in range(32)]

    async def one() -> None:
        async with httpx.AsyncClient(base_url=url, timeout=10) as client:
            while time.monotonic() < until:
                try:
                    response = await client.post("/v1/sentiment", json={"texts": texts})
                    outcome = "ok" if response.status_code == 200 else f"http {response.status_code}"
                except httpx.HTTPError as exc:
                    outcome = f"failed {type(exc).__name__}"
                log.append((time.monotonic(), outcome))

    await asyncio.gather(*(one() for _ in range(clients)))


@pytest.mark.parametrize("server", ["granian", "uvicorn"])
def test_sigterm_drains_under_load_and_drops_nothing(tiny_model, tmp_path, server) -> None:
    env = {"SENTIMENT_SERVER": server, "SENTIMENT_DRAIN_DELAY_S": str(DELAY_S), "SENTIMENT_TEACHER_ENABLED": "true"}
    with running_service(tiny_model, tmp_path, **env) as svc:
        below = process_tree(svc.process.pid)[1:]
        log: list[tuple[float, str]] = []

        async def scenario() -> tuple[float, list[tuple[float, int, dict]]]:
            await asyncio.sleep(0.5)
            signalled = time.monotonic()
            # The load runs on to just before the server stops accepting, so requests are in flight then.
            load_task = asyncio.create_task(load(svc.url, 12, signalled + DELAY_S - 0.05, log))
            await asyncio.sleep(0.3)
            svc.process.send_signal(signal.SIGTERM)
            readiness = []
            async with httpx.AsyncClient(base_url=svc.url, timeout=5) as probe:
                while time.monotonic() - signalled < DELAY_S * 0.75:
                    response = await probe.get("/health/ready", headers={"connection": "close"})
                    readiness.append((time.monotonic() - signalled, response.status_code, response.json()))
                    await asyncio.sleep(0.1)
            await load_task
            return signalled, readiness

        signalled, readiness = asyncio.run(scenario())
        svc.process.wait(timeout=DELAY_S + 20)
        with pytest.raises(httpx.ConnectError):  # once gone, new connections are refused cleanly
            httpx.post(f"{svc.url}/v1/sentiment", json={"text": "anyone there?"})
    outcomes = Counter(outcome for _, outcome in log)
    print(f"{server}: {len(log)} requests sent during the drain, outcomes {dict(outcomes)}")
    assert outcomes["ok"] > 20 and set(outcomes) == {"ok"}, outcomes  # nothing dropped, no 5xx
    assert readiness[-1][1] == 503 and readiness[-1][2]["details"]["draining"] is True, readiness[-1]
    # Requests went on being answered while readiness said 503.
    assert any(outcome == "ok" and t > signalled + DELAY_S * 0.8 for t, outcome in log)
    for pid in below:
        assert gone(pid), f"{cmdline(pid)[:80]!r} outlived the drained service"


def granian_worker(master: int) -> int:
    """The worker granian forked for `python -m service` (the child with the master's command line)."""
    workers = [pid for pid in process_tree(master)[1:] if cmdline(pid) == cmdline(master)]
    assert len(workers) == 1, [cmdline(pid) for pid in process_tree(master)]
    return workers[0]


def test_ctrl_c_stops_the_service_every_time(tiny_model, tmp_path) -> None:
    """Ctrl-C signals the whole process group, master and worker at once. granian 2.8's worker could
    deadlock in its own signal handler when its SIGINT met the master's SIGTERM (4 hangs in 40 tries, the
    master waiting forever), so the worker ignores SIGINT and the master alone stops it."""
    for _ in range(3):
        with running_service(tiny_model, tmp_path, SENTIMENT_TEACHER_ENABLED="true") as svc:
            httpx.post(f"{svc.url}/v1/sentiment", json={"text": "still here?"}).raise_for_status()
            below = process_tree(svc.process.pid)[1:]
            worker = granian_worker(svc.process.pid)
            ignored = int(next(line.split()[1] for line in Path(f"/proc/{worker}/status").read_text().splitlines()
                               if line.startswith("SigIgn:")), 16)
            assert ignored & (1 << (signal.SIGINT - 1)), "the worker must leave SIGINT to the master"
            for pid in (svc.process.pid, worker):  # as the terminal's Ctrl-C does
                os.kill(pid, signal.SIGINT)
            assert svc.process.wait(timeout=20) == 0
        for pid in below:  # the worker and the embedded teacher
            assert gone(pid), f"{cmdline(pid)[:80]!r} outlived Ctrl-C"


def test_a_worker_that_never_stops_is_killed_after_the_stop_timeout(tiny_model, tmp_path) -> None:
    """SENTIMENT_WORKER_STOP_TIMEOUT_S bounds every stop: a worker that does not stop on its own (here
    SIGSTOPped) is killed, and the master exits, where it used to wait for the worker forever."""
    env = {"SENTIMENT_WORKER_STOP_TIMEOUT_S": "2", "SENTIMENT_DRAIN_DELAY_S": "0"}
    with running_service(tiny_model, tmp_path, **env) as svc:
        worker = granian_worker(svc.process.pid)
        os.kill(worker, signal.SIGSTOP)
        stopping = time.monotonic()
        svc.process.send_signal(signal.SIGTERM)
        svc.process.wait(timeout=20)
        waited = time.monotonic() - stopping
    assert gone(worker)
    assert waited >= 1.5, f"the master gave the worker {waited:.1f} s, not its stop timeout"
