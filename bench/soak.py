"""Soak: the service at a fixed share of its own capacity for minutes, open loop; memory and latency drift.

  python bench/soak.py [--minutes 10] [--share 0.8]

Capacity is measured first (64 closed-loop clients, wrk where installed); then requests go out on a
fixed schedule at `share` × that rate from a compiled open-loop generator (bench/openloop.c, a few
percent of a core), and each latency counts from its scheduled time (queueing included). The
service's resident memory (all its processes) is sampled throughout. Prints p50/p99 per minute, the
memory growth from the first minute to the last, and exits 1 if growth is 5% or more or any request
failed. A benchmark, not a test: the machine is shared, read the drift, not the absolute figures.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.launch import percentile, process_tree
from bench.openloop import open_loop
from bench.serving import WRK, config_env, load, serve, wrk_load
from loadtests.messages import MESSAGES
from service.settings import DEFAULT_MODEL_DIR


def rss_mb(root: int) -> float:
    """Resident memory of `root` and every process below it."""
    total = 0
    for pid in process_tree(root):
        try:
            total += int(next(line.split()[1] for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                              if line.startswith("VmRSS:")))
        except (OSError, StopIteration):
            continue
    return total / 1024


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--share", type=float, default=0.8)
    parser.add_argument("--rate", type=float, default=0.0, help="requests/s instead of share x capacity")
    parser.add_argument("--config", default="auto", help="as bench/serving.py --configs: LAYOUT[:setting=value,...]")
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL_DIR)
    args = parser.parse_args()
    process, url = serve(args.model, "granian", config_env(args.config))
    memory: list[tuple[float, float]] = []
    try:
        asyncio.run(load(url, 4, 1.0))
        capacity = (wrk_load(url, 64, 8.0) if WRK else asyncio.run(load(url, 64, 8.0)))["texts_per_s"]
        rate = args.rate or args.share * capacity
        print(f"capacity {capacity:.0f} texts/s; soaking at {rate:.0f}/s for {args.minutes:g} min", flush=True)
        seconds = args.minutes * 60
        results: list[tuple[float, float, int]] = []
        generator = threading.Thread(target=lambda: results.extend(open_loop(url, rate, seconds, MESSAGES)))
        generator.start()
        started = time.perf_counter()
        while generator.is_alive():
            memory.append((time.perf_counter() - started, rss_mb(process.pid)))
            generator.join(5)
    finally:
        process.terminate()
        process.wait(timeout=30)
    failed = sum(status != 200 for _, _, status in results) + int(rate * seconds) - len(results)
    print(f"{'minute':>6} {'requests':>9} {'p50 ms':>8} {'p99 ms':>8} {'RSS MB':>8}")
    minutes = int(args.minutes + 0.999)
    for minute in range(minutes):
        latencies = [lat for t, lat, _ in results if minute * 60 <= t < (minute + 1) * 60]
        rss = [mb for t, mb in memory if minute * 60 <= t < (minute + 1) * 60] or [0.0]
        if latencies:
            print(f"{minute + 1:6d} {len(latencies):9d} {percentile(latencies, 0.5) * 1000:8.1f} "
                  f"{percentile(latencies, 0.99) * 1000:8.1f} {max(rss):8.1f}")
    first = [mb for t, mb in memory if t < 60] or [memory[0][1]]
    last = [mb for t, mb in memory if t >= seconds - 60] or [memory[-1][1]]
    growth = max(last) / max(first) - 1
    print(f"requests {len(results)}, failed {failed}; memory {max(first):.1f} -> {max(last):.1f} MB "
          f"({growth:+.1%})")
    return 1 if failed or growth >= 0.05 else 0


if __name__ == "__main__":
    sys.exit(main())
