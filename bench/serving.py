"""Serving benchmark, one run, one model file: in-process ONNX Runtime (the limit) vs the service over
HTTP at 1, 8 and 64 concurrent clients, under granian and uvicorn, per layout, beside the peers a user
might run instead (bench/peers.py: a plain server calling ONNX Runtime once per request, a transformers
fp32 pipeline() server), and the service with `"aspects": true` on every request (the aspect path's cost
beside the plain one, same process). Every measurement is taken `--rounds` times, interleaved across rows; prints
the medians and their ratios to the limit, then the same ratios paired by round (each row's figure over the
limit's, and over the other rows', taken in the same round) with their spread. The load comes from wrk
(compiled) where installed, else from a bare asyncio client.

  python bench/serving.py [--model models/sentiment-minilm-int8] [--seconds 4] [--rounds 3] [--peers plain pipeline]
                          [--restart]

The machine is shared and noisy: read the ratios, not a lone absolute time. Servers differ between starts
too (the same settings, two processes: up to 9% apart at 64 clients on an AVX2 Zen 3); for an A/B closer
than that, `--restart` starts each row's server afresh for every round. Ray Serve, busy even when idle,
is up only while its own row is measured (ALONE).
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import orjson

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.launch import percentile, start_service, wait_ready  # noqa: E402
from loadtests.messages import MESSAGES  # noqa: E402
from service.artifact import MANIFEST_FILE, cpu_flags, cpu_model, load_artifact, variants_of  # noqa: E402
from service.layout import TOKEN_BUDGETS, available_cores, candidate_shapes, pack, throughput  # noqa: E402
from service.runner import ModelRunner  # noqa: E402
from service.settings import DEFAULT_MODEL_DIR  # noqa: E402
from service.teacher_process import free_port  # noqa: E402


def in_process(model: Path, seconds: float, variant: str = "auto") -> dict[str, float]:
    """ORT alone on one int8 variant: a lone text's p50 (every core, as the service runs a lone request;
    the faster of threads that block and threads that spin between operators), and the best throughput
    over every streams x threads split and batch token budget, on the messages the servers get,
    length-sorted (a deep queue's best case): the limit a server can approach."""
    artifact = load_artifact(model, variant=variant)
    cores = available_cores()
    shapes = candidate_shapes(cores)
    runners = {threads: ModelRunner(artifact, threads=threads) for threads in {t for _, t in shapes} | {cores}}
    spinning = ModelRunner(artifact, threads=cores, spin=True)
    for runner in [*runners.values(), spinning]:
        runner.warm_up()
    lone, single, until = runners[cores], {False: [], True: []}, time.perf_counter() + seconds / 2
    i = 0
    while time.perf_counter() < until:  # interleaved, so both see the same machine
        for spin, runner in ((False, lone), (True, spinning)):
            started = time.perf_counter()
            runner.predict([MESSAGES[i % len(MESSAGES)]])
            single[spin].append(time.perf_counter() - started)
        i += 1
    out: dict[str, float] = {"single_blocking_p50_ms": statistics.median(single[False]) * 1000,
                             "single_spinning_p50_ms": statistics.median(single[True]) * 1000}
    out["single_p50_ms"] = min(out["single_blocking_p50_ms"], out["single_spinning_p50_ms"])
    encoded = [e.ids for e in lone.encode(MESSAGES * 4)]
    share = seconds / (len(shapes) * len(TOKEN_BUDGETS))
    for streams, threads in shapes:
        for budget in TOKEN_BUDGETS:
            out[f"{streams}x{threads} t{budget}"] = throughput(runners[threads].probabilities, streams,
                                                               pack(encoded, budget), share)
    out["best_texts_per_s"] = max(v for k, v in out.items() if " t" in k)
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


async def load(url: str, clients: int, seconds: float, extra: dict | None = None) -> dict[str, float]:
    """`clients` closed-loop keep-alive connections, one text per request; latency percentiles and texts/s.

    A bare asyncio HTTP/1.1 client: httpx costs more CPU per request than the service itself, which on
    a 2-core machine would measure the load generator instead of the server.
    """
    host, port = url.removeprefix("http://").split(":")
    bodies = [orjson.dumps({"text": text, **(extra or {})}) for text in MESSAGES]
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
%s
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("WRK {\\"requests\\": %%d, \\"seconds\\": %%f, \\"errors\\": %%d, "
    .. "\\"p50_us\\": %%d, \\"p99_us\\": %%d}\\n", summary.requests, summary.duration / 1e6,
    e.connect + e.read + e.write + e.status + e.timeout, latency:percentile(50), latency:percentile(99)))
end
"""
# A client that honours Retry-After: each 503 puts off one next request by that many ms (wrk keeps no
# per-connection state for its script, so the pause goes to whichever connection writes next).
_WRK_BACKOFF = """
local owed = 0
response = function(status, headers, body)
  if status == 503 then owed = owed + 1 end
end
delay = function()
  if owed > 0 then owed = owed - 1; return %d end
  return 0
end
"""


def wrk_load(url: str, clients: int, seconds: float, extra: dict | None = None,
             bodies: list[dict] | None = None, backoff_ms: int = 0) -> dict[str, float]:
    """The same closed loop from wrk (compiled, one thread): the load generator costs the servers little CPU.
    Each request is one of `bodies`, in turn (default: `{"text": message, **extra}` per message); with
    `backoff_ms`, each 503 holds a next request back that long."""
    bodies = bodies or [{"text": text, **(extra or {})} for text in MESSAGES]
    lua_bodies = ", ".join(f"[[{orjson.dumps(body).decode()}]]" for body in bodies)
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        script.write(_WRK_SCRIPT % (lua_bodies, _WRK_BACKOFF % backoff_ms if backoff_ms else ""))
    before = resource.getrusage(resource.RUSAGE_CHILDREN)  # wrk's CPU once it has been waited for
    try:
        out = subprocess.run([WRK, "-t1", f"-c{clients}", f"-d{max(1, round(seconds))}s", "-s", script.name,
                              "--timeout", "10s", url], capture_output=True, text=True, check=True).stdout
    finally:
        os.unlink(script.name)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    figures = json.loads(out[out.index("WRK ") + 4:].splitlines()[0])
    wrk_cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    return {"texts_per_s": figures["requests"] / figures["seconds"], "p50_ms": figures["p50_us"] / 1000,
            "p99_ms": figures["p99_us"] / 1000, "errors": figures["errors"],
            "generator_cores": wrk_cpu / figures["seconds"]}


def config_env(config: str) -> dict[str, str]:
    """`LAYOUT[:setting=value,...]` as the service's environment."""
    layout, _, rest = config.partition(":")
    pairs = (item.split("=", 1) for item in rest.split(",") if item)
    return {"SENTIMENT_LAYOUT": layout, **{f"SENTIMENT_{key.upper()}": value for key, value in pairs}}


def serve(model: Path, server: str, extra: dict[str, str]) -> tuple[subprocess.Popen[bytes], str]:
    return start_service({"SENTIMENT_MODEL_DIR": str(model), "SENTIMENT_SERVER": server,
                          "SENTIMENT_TEACHER_ENABLED": "false", "SENTIMENT_QUEUE_SIZE": "4096", **extra})


def serve_reporting(model: Path, server: str, config: str, label: str) -> tuple[subprocess.Popen[bytes], str]:
    """`serve` with `config` (LAYOUT[:setting=value,...]), then print the layout that start measured."""
    process, url = serve(model, server, config_env(config))
    serving = httpx.get(f"{url}/v1/model").json()["serving"]
    print(f"{label}: {serving['reason']}; backlog: {serving['backlog_reason']}", flush=True)
    return process, url


PEERS = ["plain", "pipeline", "ray"]
RAY_PYTHON = ROOT / ".cache" / "ray-venv" / "bin" / "python"  # make ray-venv


# Servers that busy the CPU while idle, so they run only for their own row: an idle Ray Serve (its GCS,
# raylet and dashboard) took 0.08 of the 2 cores on a Zen 4, and with it up all the time every other row
# and the limit measured 4-8% less (the service 836 against 921 texts/s at 64 clients, the limit 1023
# against 1080). The plain and pipeline servers take under 0.01 idle.
ALONE = {"peer/ray"}


def start_peer(kind: str, model: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    command = ([str(RAY_PYTHON), "bench/ray_peer.py"] if kind == "ray" else [sys.executable, "-m", "bench.peers", kind])
    process = subprocess.Popen([*command, "--model", str(model), "--port", str(port)],
                               cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    wait_ready(process, f"{url}/health/ready", 180)
    return process, url


def cpu_header() -> str:
    """The CPU model, the cores this process sees and the vector extensions that matter for int8 inference."""
    return f"{cpu_model()}; {os.cpu_count()} cores visible"


Rounds = list[dict[str, float]]  # one measurement's figures, a dict per round


def median_of(rounds: Rounds) -> dict[str, float]:
    return {key: statistics.median(r[key] for r in rounds) for key in rounds[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL_DIR)
    parser.add_argument("--seconds", type=float, default=4.0, help="per measurement")
    parser.add_argument("--rounds", type=int, default=3, help="every measurement this often, interleaved; medians")
    parser.add_argument("--servers", nargs="+", default=["granian", "uvicorn"])
    parser.add_argument("--configs", nargs="+", default=["auto", "1x2", "2x1"],
                        help="auto: the layout the service measures at warm-up; SxT: S streams of T ORT threads "
                             "(the batch token budget still measured); after a colon, settings for that row: "
                             "auto:lone_spin=false,max_wait_ms=1")
    parser.add_argument("--peers", nargs="*", default=PEERS, choices=PEERS,
                        help="ray needs `make ray-venv` (left out, with a note, where it is missing)")
    parser.add_argument("--clients", nargs="+", type=int, default=[1, 8, 64])
    parser.add_argument("--loader", choices=["wrk", "python"], default="wrk" if WRK else "python")
    parser.add_argument("--no-aspects", action="store_true", help="leave out the aspects-on row")
    parser.add_argument("--restart", action="store_true",
                        help="start every row's server afresh for each round, so medians span starts (two services "
                             "with the same settings differed by up to 9%% in one run on an AVX2 Zen 3)")
    args = parser.parse_args()

    def run_load(url: str, clients: int, seconds: float, extra: dict) -> dict[str, float]:
        if args.loader == "wrk":
            return wrk_load(url, clients, seconds, extra)
        return asyncio.run(load(url, clients, seconds, extra))

    starters: dict[str, Callable[[], tuple[subprocess.Popen[bytes], str]]] = {
        f"{server}/{name}": functools.partial(serve_reporting, args.model, server, name, f"{server}/{name}")
        for server in args.servers for name in args.configs}
    for kind in args.peers:
        if kind == "ray" and not RAY_PYTHON.exists():
            print(f"peer/ray left out: {RAY_PYTHON} is missing (make ray-venv)", flush=True)
            continue
        starters[f"peer/{kind}"] = functools.partial(start_peer, kind, args.model)
    rows = [(key, key, {}) for key in starters]  # (row, its server, extra request fields)
    if not args.no_aspects:  # the first server again, every request asking for aspects
        rows.insert(1, (f"{rows[0][0]} +aspects", rows[0][0], {"aspects": True}))
    services: dict[str, tuple[subprocess.Popen[bytes], str]] = {}

    def started(key: str) -> str:
        """The server's URL, started one at a time: each measures its layout on an otherwise idle machine."""
        if key not in services:
            services[key] = starters[key]()
        return services[key][1]

    def stop(key: str) -> None:
        process, _ = services.pop(key)
        process.terminate()
        process.wait(timeout=15)
        if key == "peer/ray":  # the driver's exit leaves Ray's own processes behind
            subprocess.run([str(RAY_PYTHON.parent / "ray"), "stop", "--force"], capture_output=True, check=False)

    limit_rounds: list[dict[str, float]] = []
    served: dict[str, dict[str, list[dict[str, float]]]] = {}
    try:
        if not args.restart:
            for key in starters:
                if key not in ALONE:
                    started(key)
        served_artifact = load_artifact(args.model)  # the build the servers load on this CPU
        runnable = [v.name for v in variants_of(served_artifact.manifest, args.model / MANIFEST_FILE)
                    if v.runs_on(cpu_flags())]
        for round_no in range(args.rounds):  # interleaved and rotated: drift and order hit every row alike
            limit_rounds.append({f"{name}/{key}": value for name in runnable
                                 for key, value in in_process(args.model, args.seconds, name).items()})
            for row, key, extra in rows[round_no % len(rows):] + rows[:round_no % len(rows)]:
                url = started(key)
                asyncio.run(load(url, 4, 0.5, extra))  # warm connections and code paths
                figures = served.setdefault(row, {f"c{c}": [] for c in args.clients})
                for clients in args.clients:
                    figures[f"c{clients}"].append(run_load(url, clients, args.seconds, extra))
                if args.restart or key in ALONE:
                    stop(key)
    finally:
        for key in list(services):
            stop(key)
    measured = median_of(limit_rounds)
    results = {"in_process": measured, **{key: {c: median_of(rounds) for c, rounds in figures.items()}
                                          for key, figures in served.items()}}
    print(json.dumps(results, indent=2, default=lambda v: round(v, 2)))
    print(f"\n{time.strftime('%Y-%m-%d')}, {cpu_header()}; load from {args.loader}")
    fresh = (", every server started afresh for each" if args.restart
             else f"; {', '.join(sorted(ALONE.intersection(starters))) or 'no server'} up only for its own row")
    print(f"medians of {args.rounds} interleaved rounds{fresh}; in-process ORT per int8 variant this CPU runs:")
    for name in runnable:
        shape = max((k for k in measured if k.startswith(f"{name}/") and " t" in k), key=measured.__getitem__)
        blocking, spinning = (measured[f"{name}/single_{kind}_p50_ms"] for kind in ("blocking", "spinning"))
        print(f"  {name}: single text p50 {measured[f'{name}/single_p50_ms']:.2f} ms (threads blocking "
              f"{blocking:.2f}, spinning {spinning:.2f}), best "
              f"{measured[f'{name}/best_texts_per_s']:.0f} texts/s ({shape.split('/', 1)[1]})")
    served_variant = served_artifact.variant.name  # the limit is that build's own
    limit = {key.split("/", 1)[1]: value for key, value in measured.items() if key.startswith(f"{served_variant}/")}
    print(f"the limit below is {served_variant}'s (the variant the servers serve on this CPU)")
    best = limit["best_texts_per_s"]
    header = f"{'row':24} {'c1 p50 ms':>9} {'c1/ORT':>7}"
    for clients in args.clients[1:]:
        header += f" {f'c{clients} texts/s':>13} {f'c{clients} p99 ms':>11}"
    print(header + f" {'top/limit':>9}")
    for name, figures in results.items():
        if name == "in_process":
            continue
        c1 = figures[f"c{args.clients[0]}"]
        line = f"{name:24} {c1['p50_ms']:9.2f} {c1['p50_ms'] / limit['single_p50_ms']:7.2f}"
        for clients in args.clients[1:]:
            line += f" {figures[f'c{clients}']['texts_per_s']:13.0f} {figures[f'c{clients}']['p99_ms']:11.1f}"
        top = max(f["texts_per_s"] for f in figures.values())
        print(line + f" {top / best:9.2f}")
    print(f"\npaired by round (c{args.clients[-1]} texts/s, each round's figures over the same round's):")
    for label, ratios in paired_ratios(limit_rounds, served_variant, served, args.clients[-1]):
        print(f"  {label:40} {' '.join(f'{r:.2f}' for r in ratios)}   median {statistics.median(ratios):.2f}")


def paired_ratios(limit_rounds: Rounds, variant: str, served: dict[str, dict[str, Rounds]],
                  clients: int) -> list[tuple[str, list[float]]]:
    """Per round: each row's texts/s at `clients` over the same round's limit, then the first row's over each
    other row's. A ratio of medians pairs figures taken minutes apart; these pair figures of one round."""
    rate = {row: [r["texts_per_s"] for r in figures[f"c{clients}"]] for row, figures in served.items()}
    limit = [r[f"{variant}/best_texts_per_s"] for r in limit_rounds]
    pairs = [(f"{row} / limit", [a / b for a, b in zip(values, limit, strict=True)]) for row, values in rate.items()]
    first, *others = rate
    pairs += [(f"{first} / {row}", [a / b for a, b in zip(rate[first], rate[row], strict=True)]) for row in others]
    return pairs


if __name__ == "__main__":
    main()
