"""Where a served request's time goes: the service under wrk at 1 and at 64 connections, with the CPU of
each of its threads (from /proc) and the batcher's own metrics, beside ONNX Runtime in-process on the
same batch shapes and layout. It answers the two questions the serving benchmark raises:

- at one connection, what the service adds to one inference: event-loop CPU per request (HTTP,
  routing, validation, tokenising, the batcher), and granian's I/O thread;
- at 64 connections, why the service falls short of the in-process limit: the share of time a stream
  is busy, and how much slower the same batches run in the service (its event loop takes a share of
  the cores the streams need) than alone in-process;
- under open loop at shares of the 64-connection rate (`--shares`, 0.7 by default: the performance
  target's p99 is set there; requests on a fixed schedule), why the tail grows with the rate: the
  batches the arrivals form, what they cost, how long texts queue, and what the streams would serve with
  batches like those (below the saturated rate where that came from larger batches).

  python bench/breakdown.py [--seconds 6] [--rounds 3] [--config auto] [--shares 0.4 0.7]

Linux only (/proc). Medians of interleaved rounds; the machine is shared, read shares and ratios.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.launch import process_tree
from bench.rates import open_loop_figures
from bench.serving import MESSAGES, config_env, serve, wrk_load
from service.artifact import load_artifact
from service.layout import throughput
from service.runner import ModelRunner
from service.settings import DEFAULT_MODEL_DIR

TICKS = 100  # clock ticks per second in /proc/*/stat (USER_HZ, 100 on Linux)
ROLES = ("event loop", "granian I/O", "inference + ORT pools", "load generator")


def thread_cpu(pid: int) -> dict[str, float]:
    """CPU seconds per thread of `pid`, keyed by role: its main thread runs the event loop; granian's
    Rust I/O runtime names its threads tokio-*; the rest are inference and ONNX Runtime pool threads."""
    out = {"event loop": 0.0, "granian I/O": 0.0, "inference + ORT pools": 0.0}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            name = (task / "comm").read_text().strip()
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # the thread ended
            continue
        seconds = (int(fields[11]) + int(fields[12])) / TICKS
        role = "event loop" if int(task.name) == pid else "granian I/O" if name.startswith("tokio") \
            else "inference + ORT pools"
        out[role] += seconds
    return out


def machine_cpu() -> dict[str, float]:
    """CPU seconds of the whole machine (/proc/stat): busy, idle, and stolen by the hypervisor for other
    guests (a shared machine's noise, visible)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:9]]
    user, nice, system, idle, iowait, irq, softirq, steal = fields
    return {"busy": (user + nice + system + irq + softirq) / TICKS, "idle": (idle + iowait) / TICKS,
            "steal": steal / TICKS}


def metric_sums(url: str) -> dict[str, float]:
    wanted = ("sentiment_inference_duration_seconds_sum", "sentiment_inference_duration_seconds_count",
              "sentiment_batch_size_sum", "sentiment_batch_tokens_sum", "sentiment_queue_wait_seconds_sum",
              "sentiment_queue_wait_seconds_count")
    values = {name: 0.0 for name in (*wanted, "in_app_sum", "in_app_count")}
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        name, _, value = line.rpartition(" ")
        if name in values:
            values[name] = float(value)
        elif name.startswith("sentiment_request_duration_seconds_") and 'route="/v1/sentiment"' in name:
            kind = name.partition("{")[0].rpartition("_")[2]  # sum, count or bucket
            if kind in ("sum", "count"):
                values[f"in_app_{kind}"] += float(value)
    return values


Load = Callable[[float], dict[str, float]]  # seconds -> texts_per_s, p50_ms, p99_ms, failed, generator_cores


def closed_loop(url: str, clients: int) -> Load:
    def load(seconds: float) -> dict[str, float]:
        figures = wrk_load(url, clients, seconds)
        return {**figures, "failed": figures["errors"]}
    return load


def scheduled(url: str, rate: float) -> Load:
    """Open loop from the compiled generator (bench/rates.py): latency from each request's scheduled time."""
    def load(seconds: float) -> dict[str, float]:
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        figures = open_loop_figures(url, rate, seconds)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        generator = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
        return {**figures, "generator_cores": generator / seconds}
    return load


def measure(load: Load, url: str, worker: int, streams: int, seconds: float) -> dict[str, float]:
    load(1.0)  # warm
    cpu, sums, machine = thread_cpu(worker), metric_sums(url), machine_cpu()
    figures = load(seconds)
    cpu_after, sums_after, machine_after = thread_cpu(worker), metric_sums(url), machine_cpu()
    delta = {k: sums_after[k] - sums[k] for k in sums}
    requests = figures["texts_per_s"] * seconds
    batches = max(1.0, delta["sentiment_inference_duration_seconds_count"])
    out = {"texts_per_s": figures["texts_per_s"], "p50_ms": figures["p50_ms"], "p99_ms": figures["p99_ms"],
           "failed": figures["failed"],
           "batch_texts": delta["sentiment_batch_size_sum"] / batches,
           "batch_ms": delta["sentiment_inference_duration_seconds_sum"] / batches * 1000,
           "queue_wait_ms": delta["sentiment_queue_wait_seconds_sum"]
           / max(1.0, delta["sentiment_queue_wait_seconds_count"]) * 1000,
           "in_app_ms": delta["in_app_sum"] / max(1.0, delta["in_app_count"]) * 1000,
           "inference_busy_s": delta["sentiment_inference_duration_seconds_sum"] / seconds}
    # What the streams would serve, busy all the time, with every batch like these: where the saturated rate
    # comes from batches larger than a lighter load forms, this is lower, and the load nearer its limit.
    out["capacity_at_these_batches"] = streams * out["batch_texts"] / max(out["batch_ms"], 1e-9) * 1000
    for role, value in cpu_after.items():
        out[f"{role} cores"] = (value - cpu[role]) / seconds
        out[f"{role} ms/request"] = (value - cpu[role]) / max(requests, 1.0) * 1000
    out["load generator cores"] = figures["generator_cores"]
    out["load generator ms/request"] = figures["generator_cores"] / max(figures["texts_per_s"], 1e-9) * 1000
    machine_cores = {k: (machine_after[k] - machine[k]) / seconds for k in machine}
    accounted = sum(out[f"{role} cores"] for role in ROLES)
    out["anything else busy cores"] = max(0.0, machine_cores["busy"] - accounted)
    out["idle cores"], out["stolen cores"] = machine_cores["idle"], machine_cores["steal"]
    return out


def in_process_batch_ms(model: Path, threads: int, streams: int, batch_texts: int, seconds: float) -> float:
    """Milliseconds per batch of `batch_texts` messages on `streams` streams of `threads` threads, alone."""
    runner = ModelRunner(load_artifact(model), threads=threads)  # as served by default
    runner.warm_up()
    ids = [e.ids for e in runner.encode(MESSAGES)]
    batches = [[ids[(i + k) % len(ids)] for k in range(batch_texts)] for i in range(len(ids))]
    texts_per_s = throughput(runner.probabilities, streams, batches, seconds)
    return batch_texts * streams / texts_per_s * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL_DIR)
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--config", default="auto", help="as bench/serving.py --configs: LAYOUT[:setting=value,...]")
    parser.add_argument("--shares", nargs="*", type=float, default=[0.7],
                        help="open-loop loads at these shares of the first round's 64-connection rate")
    args = parser.parse_args()
    process, url = serve(args.model, "granian", config_env(args.config))
    try:
        serving = httpx.get(f"{url}/v1/model").json()["serving"]
        worker = max(process_tree(process.pid), key=lambda pid: len(list(Path(f"/proc/{pid}/task").iterdir())))
        streams, threads = serving["streams"], serving["threads"]
        loads = {"1 connection(s)": closed_loop(url, 1), "64 connection(s)": closed_loop(url, 64)}
        rounds: dict[str, list[dict[str, float]]] = {}
        for round_no in range(args.rounds):
            for name, load in list(loads.items()):
                rounds.setdefault(name, []).append(measure(load, url, worker, streams, args.seconds))
            if round_no == 0:  # the open-loop rates follow from the first saturated figure, fixed from then on
                saturated_rate = rounds["64 connection(s)"][0]["texts_per_s"]
                for share in args.shares:
                    rate = round(share * saturated_rate)
                    name = f"open loop at {rate}/s ({share:.0%} of 64 connections' {saturated_rate:.0f})"
                    loads[name] = scheduled(url, rate)
                    rounds[name] = [measure(loads[name], url, worker, streams, args.seconds)]
    finally:
        process.terminate()
        process.wait(timeout=30)
    figures = {c: {k: statistics.median(r[k] for r in runs) for k in runs[0]} for c, runs in rounds.items()}
    saturated = figures["64 connection(s)"]
    alone = in_process_batch_ms(args.model, threads, streams, max(1, round(saturated["batch_texts"])), args.seconds)
    print(f"{time.strftime('%Y-%m-%d')}: layout {streams}x{threads}, batches up to {serving['batch_tokens']} tokens; "
          f"medians of {args.rounds} rounds of {args.seconds:g} s")
    for name, f in figures.items():
        failed = f", {f['failed']:.0f} failed" if f["failed"] else ""
        print(f"\n{name}: {f['texts_per_s']:.0f} texts/s, p50 {f['p50_ms']:.2f} ms, p99 {f['p99_ms']:.1f} ms{failed}; "
              f"batches of {f['batch_texts']:.1f} texts, {f['batch_ms']:.2f} ms each")
        print(f"  mean time in the app {f['in_app_ms']:.2f} ms: {f['queue_wait_ms']:.2f} queued, "
              f"{f['batch_ms']:.2f} in a batch, {f['in_app_ms'] - f['queue_wait_ms'] - f['batch_ms']:.2f} before and "
              f"after (HTTP parsing, tokenising, handing over between threads)")
        for role in ROLES:
            print(f"  {role:26} {f[f'{role} cores']:5.2f} cores  {f[f'{role} ms/request']:6.3f} ms CPU per request")
        for rest in ("anything else busy", "idle", "stolen"):
            print(f"  {rest:26} {f[f'{rest} cores']:5.2f} cores")
        print(f"  streams busy {f['inference_busy_s'] / streams:.0%} of the time; batches like these would serve "
              f"{f['capacity_at_these_batches']:.0f} texts/s")
    print(f"\nthe same batches ({round(saturated['batch_texts'])} texts) in-process, {streams}x{threads}, nothing "
          f"else running: {alone:.2f} ms each; in the service {saturated['batch_ms']:.2f} ms "
          f"({saturated['batch_ms'] / alone:.2f}x: the event loop's {saturated['event loop cores']:.2f} cores come out "
          f"of the streams' share)")


if __name__ == "__main__":
    main()
