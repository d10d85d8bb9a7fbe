"""The whole app without HTTP: configurations driven over raw ASGI by concurrent callers in one process,
side by side, with what their streams did per batch (from each app's own metrics).

  python bench/inapp.py [--model DIR] --configs 2x1:max_batch_tokens=64 2x1:max_batch_tokens=128 [--clients 64]
                        [--seconds 4] [--rounds 3]

Why it exists: at 64 HTTP clients on an AVX2 Zen 3, 64-token batches served 0.67-0.73 of the limit and
128-token batches 0.83, while in-process ONNX Runtime (the calibration, the bench's limit) measured the
two within 2% of each other. This separates the service's own path (routing, tokenising, the batcher,
its threads and the GIL) from HTTP and from the load generator: whatever differs here between two
configurations, the server and wrk did not cause. Every app is started (and calibrates) before the first
measurement; rounds visit them in turn, order reversed every other round; idle apps' streams sleep.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import statistics
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import orjson
from litestar import Litestar

from bench.serving import MESSAGES, config_env, cpu_header
from service.app import create_app
from service.settings import DEFAULT_MODEL_DIR, Settings

BODIES = [orjson.dumps({"text": message}) for message in MESSAGES]


async def post(app: Litestar, body: bytes) -> int:
    """One POST /v1/sentiment straight into the ASGI app; its status."""
    status = 0
    pending = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive() -> dict[str, Any]:
        if pending:
            return pending.pop()
        await asyncio.Event().wait()  # no hang-up: wait until cancelled
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/v1/sentiment", "raw_path": b"/v1/sentiment", "query_string": b"", "root_path": "",
             "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
             "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 8000), "state": {}}
    await app(scope, receive, send)
    return status


@contextlib.asynccontextmanager
async def running(app: Litestar) -> AsyncIterator[Litestar]:
    """The app's lifespan, held open until it is ready to score."""
    inbox: asyncio.Queue[dict[str, str]] = asyncio.Queue()
    outbox: asyncio.Queue[dict[str, str]] = asyncio.Queue()
    lifespan = asyncio.create_task(app({"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}},
                                       inbox.get, outbox.put))
    await inbox.put({"type": "lifespan.startup"})
    if (await outbox.get())["type"] != "lifespan.startup.complete":
        raise RuntimeError("the app did not start")
    while not app.state.scorer.ready:
        await asyncio.sleep(0.1)
    try:
        yield app
    finally:
        await inbox.put({"type": "lifespan.shutdown"})
        await outbox.get()
        await lifespan


def totals(app: Litestar) -> dict[str, float]:
    sample = app.state.metrics.registry.get_sample_value
    return {"batches": sample("sentiment_batch_size_count") or 0.0,
            "texts": sample("sentiment_batch_size_sum") or 0.0,
            "inference_s": sample("sentiment_inference_duration_seconds_sum") or 0.0}


async def measure(app: Litestar, clients: int, seconds: float) -> dict[str, float]:
    """Texts/s with `clients` callers each posting one text after another, and per batch: texts, wall time,
    and how busy the streams were."""
    before, failed, started = totals(app), 0, time.perf_counter()
    until = started + seconds

    async def caller(k: int) -> None:
        nonlocal failed
        i = k
        while time.perf_counter() < until:
            failed += await post(app, BODIES[i % len(BODIES)]) != 200
            i += clients

    await asyncio.gather(*(caller(k) for k in range(clients)))
    elapsed = time.perf_counter() - started
    after = totals(app)
    batches = max(1.0, after["batches"] - before["batches"])
    inference = after["inference_s"] - before["inference_s"]
    return {"texts_per_s": (after["texts"] - before["texts"]) / elapsed,
            "texts_per_batch": (after["texts"] - before["texts"]) / batches,
            "batch_ms": 1000 * inference / batches,
            "streams_busy": inference / (elapsed * app.state.scorer.engine.layout.streams),
            "failed": failed}


async def compare(model: Path, configs: list[str], clients: int, seconds: float,
                  rounds: int) -> dict[str, list[dict[str, float]]]:
    figures: dict[str, list[dict[str, float]]] = {config: [] for config in configs}
    async with contextlib.AsyncExitStack() as stack:
        apps = {}
        for config in configs:
            settings = Settings.from_env({**os.environ, "SENTIMENT_MODEL_DIR": str(model),
                                          "SENTIMENT_TEACHER_ENABLED": "false", **config_env(config)})
            apps[config] = await stack.enter_async_context(running(create_app(settings)))
        for round_no in range(rounds):
            for config in configs if round_no % 2 == 0 else configs[::-1]:
                figures[config].append(await measure(apps[config], clients, seconds))
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL_DIR)
    parser.add_argument("--configs", nargs="+", required=True, help="as bench/serving.py: LAYOUT[:setting=value,...]")
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=4.0, help="per measurement")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    figures = asyncio.run(compare(args.model, args.configs, args.clients, args.seconds, args.rounds))
    print(f"{time.strftime('%Y-%m-%d')}, {cpu_header()}; {args.clients} callers over raw ASGI, no HTTP; "
          f"medians of {args.rounds} interleaved rounds of {args.seconds:g} s")
    print(f"{'config':36} {'texts/s':>8} {'texts/batch':>12} {'ms/batch':>9} {'streams busy':>13} {'failed':>7}")
    lost = 0
    for config, rows in figures.items():
        median = {key: statistics.median(row[key] for row in rows) for key in rows[0]}
        lost += sum(int(row["failed"]) for row in rows)
        print(f"{config:36} {median['texts_per_s']:8.0f} {median['texts_per_batch']:12.1f} {median['batch_ms']:9.1f}"
              f" {median['streams_busy']:12.0%} {sum(int(row['failed']) for row in rows):7d}")
    return 1 if lost else 0


if __name__ == "__main__":
    sys.exit(main())
