"""Serving benchmark, one run, one model file: in-process ONNX Runtime (the limit) vs the service over
HTTP at 1 and 64 concurrent clients, under uvicorn and granian, per layout. Every measurement is taken
`--rounds` times, interleaved across rows; prints the medians and their ratios to the limit.

  python bench/serving.py [--model models/sentiment-minilm-int8] [--seconds 4] [--rounds 3]

The machine is shared and noisy: read the ratios, not a lone absolute time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import orjson

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.launch import start_service  # noqa: E402
from loadtests.messages import MESSAGES  # noqa: E402
from service.artifact import load_artifact  # noqa: E402
from service.runner import ModelRunner  # noqa: E402
from service.settings import DEFAULT_MODEL_DIR  # noqa: E402


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def in_process(model: Path, seconds: float) -> dict[str, float]:
    """ORT alone: single-text latency (p50) and batched throughput (batch 8 and 32, length-sorted)."""
    runner = ModelRunner(load_artifact(model))
    runner.warm_up()
    single, until = [], time.perf_counter() + seconds / 2
    i = 0
    while time.perf_counter() < until:
        started = time.perf_counter()
        runner.predict([MESSAGES[i % len(MESSAGES)]])
        single.append(time.perf_counter() - started)
        i += 1
    out = {"single_p50_ms": statistics.median(single) * 1000}
    encoded = sorted((e.ids for e in runner.encode(MESSAGES * 8)), key=len)
    for batch in (8, 32):
        done, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds / 4:
            for start in range(0, len(encoded), batch):
                chunk = encoded[start:start + batch]
                runner.probabilities(chunk)
                done += len(chunk)
        out[f"batch{batch}_texts_per_s"] = done / (time.perf_counter() - started)
    return out


async def post_json(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, body: bytes) -> bool:
    """One POST /v1/sentiment on a keep-alive connection, its answer read whole; True for a 200."""
    writer.write(b"POST /v1/sentiment HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
                 b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    head = await reader.readuntil(b"\r\n\r\n")
    length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length")))
    await reader.readexactly(length)
    return head.startswith(b"HTTP/1.1 200")


async def load(url: str, clients: int, seconds: float) -> dict[str, float]:
    """`clients` closed-loop keep-alive connections, one text per request; latency percentiles and texts/s.

    A bare asyncio HTTP/1.1 client: httpx costs more CPU per request than the service itself, which on
    a 2-core machine would measure the load generator instead of the server.
    """
    host, port = url.removeprefix("http://").split(":")
    bodies = [orjson.dumps({"text": text}) for text in MESSAGES]
    latencies: list[float] = []
    errors = 0
    until = time.perf_counter() + seconds

    async def one_client(offset: int) -> None:
        nonlocal errors
        reader, writer = await asyncio.open_connection(host, int(port))
        i = offset
        while time.perf_counter() < until:
            started = time.perf_counter()
            if await post_json(reader, writer, bodies[i % len(bodies)]):
                latencies.append(time.perf_counter() - started)
            else:
                errors += 1
            i += 1
        writer.close()

    started = time.perf_counter()
    await asyncio.gather(*(one_client(k) for k in range(clients)))
    elapsed = time.perf_counter() - started
    return {"texts_per_s": len(latencies) / elapsed, "p50_ms": percentile(latencies, 0.5) * 1000,
            "p99_ms": percentile(latencies, 0.99) * 1000, "errors": errors}


WRK = shutil.which("wrk")
_WRK_SCRIPT = """
local bodies = {%s}
local i = 0
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
request = function()
  i = i + 1
  return wrk.format(nil, "/v1/sentiment", nil, bodies[i %% #bodies + 1])
end
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("WRK {\\"requests\\": %%d, \\"seconds\\": %%f, \\"errors\\": %%d, "
    .. "\\"p50_us\\": %%d, \\"p99_us\\": %%d}\\n", summary.requests, summary.duration / 1e6,
    e.connect + e.read + e.write + e.status + e.timeout, latency:percentile(50), latency:percentile(99)))
end
"""


def wrk_load(url: str, clients: int, seconds: float) -> dict[str, float]:
    """The same closed loop from wrk (compiled, one thread): the load generator costs the servers little CPU."""
    bodies = ", ".join(f"[[{orjson.dumps({'text': text}).decode()}]]" for text in MESSAGES)
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        script.write(_WRK_SCRIPT % bodies)
    try:
        out = subprocess.run([WRK, "-t1", f"-c{clients}", f"-d{max(1, round(seconds))}s", "-s", script.name,
                              "--timeout", "10s", url], capture_output=True, text=True, check=True).stdout
    finally:
        os.unlink(script.name)
    figures = json.loads(out[out.index("WRK ") + 4:].splitlines()[0])
    return {"texts_per_s": figures["requests"] / figures["seconds"], "p50_ms": figures["p50_us"] / 1000,
            "p99_ms": figures["p99_us"] / 1000, "errors": figures["errors"]}


def serve(model: Path, server: str, extra: dict[str, str]) -> tuple[subprocess.Popen[bytes], str]:
    return start_service({"SENTIMENT_MODEL_DIR": str(model), "SENTIMENT_SERVER": server,
                          "SENTIMENT_TEACHER_ENABLED": "false", "SENTIMENT_QUEUE_SIZE": "4096", **extra})


def median_of(rounds: list[dict[str, float]]) -> dict[str, float]:
    return {key: statistics.median(r[key] for r in rounds) for key in rounds[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL_DIR)
    parser.add_argument("--seconds", type=float, default=4.0, help="per measurement")
    parser.add_argument("--rounds", type=int, default=3, help="every measurement this often, interleaved; medians")
    parser.add_argument("--servers", nargs="+", default=["granian", "uvicorn"])
    parser.add_argument("--configs", nargs="+", default=["auto", "1x2", "2x1"],
                        help="auto: the layout the service measures at warm-up; SxT: S streams of T ORT threads "
                             "(the batch token budget still measured)")
    args = parser.parse_args()
    services: dict[str, tuple[subprocess.Popen[bytes], str]] = {}
    limit_rounds: list[dict[str, float]] = []
    served: dict[str, dict[str, list[dict[str, float]]]] = {}
    try:
        for server in args.servers:  # one at a time: each measures its layout on an otherwise idle machine
            for name in args.configs:
                process, url = serve(args.model, server, {"SENTIMENT_LAYOUT": name})
                services[f"{server}/{name}"] = (process, url)
                print(f"{server}/{name}: {httpx.get(f'{url}/v1/model').json()['serving']['reason']}", flush=True)
        rows = list(services.items())
        for round_no in range(args.rounds):  # interleaved and rotated: drift and order hit every row alike
            limit_rounds.append(in_process(args.model, args.seconds))
            for key, (_, url) in rows[round_no % len(rows):] + rows[:round_no % len(rows)]:
                asyncio.run(load(url, 4, 0.5))  # warm connections and code paths
                figures = served.setdefault(key, {"c1": [], "c64": []})
                for clients in (1, 64):
                    figures[f"c{clients}"].append(asyncio.run(load(url, clients, args.seconds)))
    finally:
        for process, _ in services.values():
            process.terminate()
            process.wait(timeout=15)
    limit = median_of(limit_rounds)
    results = {"in_process": limit, **{key: {c: median_of(rounds) for c, rounds in figures.items()}
                                       for key, figures in served.items()}}
    print(json.dumps(results, indent=2, default=lambda v: round(v, 2)))
    print(f"\nmedians of {args.rounds} interleaved rounds; in-process ORT: single text p50 "
          f"{limit['single_p50_ms']:.2f} ms, batch 8 {limit['batch8_texts_per_s']:.0f} texts/s, "
          f"batch 32 {limit['batch32_texts_per_s']:.0f} texts/s")
    print(f"{'config':22} {'c1 p50 ms':>10} {'c1/ORT':>7} {'c64 texts/s':>12} {'c64/ORT b8':>11} {'c64 p99 ms':>11}")
    for name, figures in results.items():
        if name == "in_process":
            continue
        c1, c64 = figures["c1"], figures["c64"]
        print(f"{name:22} {c1['p50_ms']:10.2f} {c1['p50_ms'] / limit['single_p50_ms']:7.2f} "
              f"{c64['texts_per_s']:12.0f} {c64['texts_per_s'] / limit['batch8_texts_per_s']:11.2f} "
              f"{c64['p99_ms']:11.1f}")


if __name__ == "__main__":
    main()
