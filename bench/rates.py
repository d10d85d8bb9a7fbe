"""Service configurations side by side under independent arrivals: open loop at several rates (the
compiled generator, latency from each request's scheduled time) and one closed-loop client (wrk). Made
for settings whose effect depends on how requests arrive, such as SENTIMENT_LONE_SPIN: a client that
waits for each answer and clients that do not can disagree.

  python bench/rates.py --configs auto auto:lone_spin=false [--rates 20 50 100 200] [--seconds 20] [--rounds 3]
                        [--restart]

Every configuration runs as its own service, all started before the first measurement (`--restart`:
each started afresh for every round, since two services with the same settings can differ by more than
an A/B's effect); each round visits them in turn (order reversed every other round). Prints the layout
each start measured, then p50/p99 per rate and configuration, the median over rounds, and each round's
figures. A benchmark: read the ratios, the machine is shared.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.launch import percentile
from bench.openloop import open_loop
from bench.serving import MESSAGES, WRK, serve_reporting, wrk_load
from service.settings import DEFAULT_MODEL_DIR


def open_loop_figures(url: str, rate: float, seconds: float) -> dict[str, float]:
    results = open_loop(url, rate, seconds, MESSAGES)
    answered = [latency * 1000 for _, latency, status in results if status == 200]
    return {"p50_ms": percentile(answered, 0.5), "p99_ms": percentile(answered, 0.99),
            "failed": len(results) - len(answered), "texts_per_s": len(answered) / seconds}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL_DIR)
    parser.add_argument("--configs", nargs="+", required=True, help="as bench/serving.py: LAYOUT[:setting=value,...]")
    parser.add_argument("--rates", nargs="+", type=float, default=[20, 50, 100, 200], help="requests/s, open loop")
    parser.add_argument("--seconds", type=float, default=20.0, help="per measurement")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--restart", action="store_true", help="each service started afresh every round")
    args = parser.parse_args()

    services: dict[str, tuple[subprocess.Popen[bytes], str]] = {}

    def stop(config: str) -> None:
        process, _ = services.pop(config)
        process.terminate()
        process.wait()

    rows: dict[tuple[str, str], list[dict[str, float]]] = {}
    try:
        for round_no in range(args.rounds):
            for config in args.configs:  # one at a time: each measures its layout on an otherwise idle machine
                if config not in services:
                    services[config] = serve_reporting(args.model, "granian", config, config)
            order = list(services.items())[::-1 if round_no % 2 else 1]
            for rate in args.rates:
                for config, (_, url) in order:
                    rows.setdefault((f"{rate:g}/s", config), []).append(open_loop_figures(url, rate, args.seconds))
            if WRK is not None:
                for config, (_, url) in order:
                    figures = wrk_load(url, 1, min(args.seconds, 5))
                    rows.setdefault(("1 client", config), []).append(
                        {"p50_ms": figures["p50_ms"], "p99_ms": figures["p99_ms"], "failed": figures["errors"]})
            if args.restart:
                for config in args.configs:
                    stop(config)
    finally:
        for config in list(services):
            stop(config)

    fresh = ", every service started afresh for each" if args.restart else ""
    print(f"medians of {args.rounds} rounds{fresh}, {args.seconds:g} s each; open loop unless '1 client' (wrk)")
    print(f"{'load':10s} {'config':34s} {'p50 ms':>8s} {'p99 ms':>8s} {'failed':>7s}   rounds (p50/p99)")
    failed = 0
    for (load, config), figures in rows.items():
        p50, p99 = (statistics.median(f[key] for f in figures) for key in ("p50_ms", "p99_ms"))
        lost = sum(f["failed"] for f in figures)
        failed += lost
        each = ", ".join(f"{f['p50_ms']:.2f}/{f['p99_ms']:.2f}" for f in figures)
        print(f"{load:10s} {config:34s} {p50:8.2f} {p99:8.2f} {lost:7d}   {each}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
