"""Locust load tests, headless, against the real service.

  python loadtests/run.py steps [--url http://127.0.0.1:8000] [--slo loadtests/slo.toml]   # make loadtest
  python loadtests/run.py compare                 # starts the service itself: student only vs auto fallback
  python loadtests/run.py compare --url http://host:8000 --scenarios external --users 64 --seconds 30

`steps`: users rise in the steps of the SLO file against a running service (`make serve`); each step's
p99 and error ratio are judged against its gates, and the run exits 1 if any gate fails. It writes
Locust's HTML report and CSV stats, steps.json and a PNG chart of throughput and p50/p99 against users
into runs/loadtest/<time>/.
`compare`: scenarios side by side in one run: `student` (fallback never), `fallback` (auto at
--threshold with the embedded teacher), `external` (whatever runs at --url).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.launch import start_service  # noqa: E402
from loadtests.slo import PlanError, load_plan  # noqa: E402


def percentile(histogram: dict[str, int], q: float) -> float:
    """Percentile from Locust's response-time histogram (ms buckets)."""
    items = sorted((float(ms), count) for ms, count in histogram.items())
    total, seen = sum(count for _, count in items), 0
    for ms, count in items:
        seen += count
        if seen >= q * total:
            return ms
    return items[-1][0] if items else float("nan")


def run_locust(url: str, users: int, seconds: int) -> dict[str, float]:
    command = [sys.executable, "-m", "locust", "-f", str(ROOT / "loadtests" / "locustfile.py"), "--headless",
               "-u", str(users), "-r", str(users), "-t", f"{seconds}s", "--host", url, "--json", "--only-summary",
               "--loglevel", "ERROR"]
    result = subprocess.run(command, capture_output=True, text=True, check=False, timeout=seconds + 120)
    stats = json.loads(result.stdout)
    merged: dict[str, int] = {}
    requests = failures = 0
    texts = 0.0
    start = min(s["start_time"] for s in stats)
    end = max(s["last_request_timestamp"] for s in stats)
    for entry in stats:
        requests += entry["num_requests"]
        failures += entry["num_failures"]
        texts += entry["num_requests"] * (1 if "[1 text]" in entry["name"] else 5)  # 2-8 texts: mean 5
        for ms, count in entry["response_times"].items():
            merged[ms] = merged.get(ms, 0) + count
    elapsed = max(1e-6, end - start)
    return {"requests_per_s": requests / elapsed, "texts_per_s": texts / elapsed, "failures": failures,
            "p50_ms": percentile(merged, 0.5), "p95_ms": percentile(merged, 0.95), "p99_ms": percentile(merged, 0.99)}


def fallback_counts(url: str) -> dict[str, float]:
    counts: dict[str, float] = {}
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith("sentiment_fallbacks_total{"):
            labels, value = line.rsplit(" ", 1)
            counts[labels[len("sentiment_fallbacks_total"):]] = float(value)
    return counts


def run_steps(url: str, slo: Path, config: dict[str, Any], out: Path) -> list[dict[str, Any]]:
    """Locust with the step shape (plan `config`, read from `slo`); Locust's HTML and CSV files and
    steps.json land in `out`."""
    out.mkdir(parents=True, exist_ok=True)
    seconds = config["step_seconds"] * len(config["steps"])
    command = [sys.executable, "-m", "locust", "-f",
               f"{ROOT / 'loadtests' / 'locustfile.py'},{ROOT / 'loadtests' / 'steps.py'}", "--headless",
               "--host", url, "--html", str(out / "report.html"), "--csv", str(out / "locust"),
               "--csv-full-history", "--only-summary", "--loglevel", "ERROR"]
    env = {**os.environ, "SENTIMENT_LOADTEST_SLO": str(slo), "SENTIMENT_LOADTEST_STEPS_OUT": str(out / "steps.json"),
           "SENTIMENT_LOADTEST_WAIT_S": str(config["think_seconds"])}
    result = subprocess.run(command, env=env, capture_output=True, text=True, check=False, timeout=seconds + 120)
    if not (out / "steps.json").exists():
        raise RuntimeError(f"locust wrote no step figures (exit {result.returncode}):\n{result.stderr[-3000:]}")
    return json.loads((out / "steps.json").read_text())


def failed_gates(steps: list[dict[str, Any]]) -> list[str]:
    """One line per broken gate; a step with no answers at all fails."""
    broken = []
    for step in steps:
        if step["gate_p99_ms"] is not None and not step["p99_ms"] <= step["gate_p99_ms"]:
            broken.append(f"{step['users']} users: p99 {step['p99_ms']:.1f} ms > {step['gate_p99_ms']} ms")
        if step["gate_error_ratio"] is not None and not step["error_ratio"] <= step["gate_error_ratio"]:
            broken.append(f"{step['users']} users: error ratio {step['error_ratio']:.4f} > {step['gate_error_ratio']}")
    return broken


def chart(steps: list[dict[str, Any]], title: str, path: Path) -> None:
    """Throughput and p50/p99 against users, with the p99 gates."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    users = [s["users"] for s in steps]
    figure, rate_axes = plt.subplots(figsize=(8, 4.5))
    rate_axes.plot(users, [s["texts_per_s"] for s in steps], "o-", color="tab:blue", label="texts/s")
    rate_axes.plot(users, [s["requests_per_s"] for s in steps], "o--", color="tab:cyan", label="requests/s")
    rate_axes.set_xlabel("users")
    rate_axes.set_ylabel("throughput (per second)")
    latency_axes = rate_axes.twinx()
    latency_axes.plot(users, [s["p50_ms"] for s in steps], "s-", color="tab:green", label="p50 ms")
    latency_axes.plot(users, [s["p99_ms"] for s in steps], "s-", color="tab:red", label="p99 ms")
    gates = [(s["users"], s["gate_p99_ms"]) for s in steps if s["gate_p99_ms"] is not None]
    if gates:
        latency_axes.plot(*zip(*gates, strict=True), "_", color="tab:red", markersize=20, label="p99 gate")
    latency_axes.set_ylabel("latency (ms)")
    latency_axes.set_ylim(bottom=0)
    handles = rate_axes.get_legend_handles_labels()[0] + latency_axes.get_legend_handles_labels()[0]
    rate_axes.legend(handles, [h.get_label() for h in handles], loc="upper left", fontsize=8)
    rate_axes.set_title(title, fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def steps_main(args: argparse.Namespace) -> int:
    try:
        plan = load_plan(args.slo)
    except PlanError as exc:
        print(exc, file=sys.stderr)
        return 2
    try:
        ready = httpx.get(f"{args.url}/health/ready", timeout=5)
    except httpx.HTTPError as exc:
        print(f"no service at {args.url} ({exc}): start it with `make serve` first", file=sys.stderr)
        return 2
    if ready.status_code != 200:
        print(f"{args.url} is not ready ({ready.status_code}): {ready.text[:300]}", file=sys.stderr)
        return 2
    out = args.out or ROOT / "runs" / "loadtest" / time.strftime("%Y%m%d-%H%M%S")
    steps = run_steps(args.url, args.slo, plan, out)
    print(f"{'users':>6} {'req/s':>8} {'texts/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'gate':>6} {'errors':>8}")
    for s in steps:
        gate = "-" if s["gate_p99_ms"] is None else f"{s['gate_p99_ms']:g}"
        p99 = "n/a" if math.isnan(s["p99_ms"]) else f"{s['p99_ms']:.1f}"
        print(f"{s['users']:6d} {s['requests_per_s']:8.0f} {s['texts_per_s']:8.0f} {s['p50_ms']:8.1f} {p99:>8} "
              f"{gate:>6} {s['failures']:8d}")
    chart(steps, f"step load against {args.url} ({time.strftime('%Y-%m-%d')})", out / "chart.png")
    broken = failed_gates(steps)
    print(f"\nreport: {out / 'report.html'}, CSV: {out}/locust_*.csv, chart: {out / 'chart.png'}")
    gates = sum(s[key] is not None for s in steps for key in ("gate_p99_ms", "gate_error_ratio"))
    print("gates: " + ("FAILED\n  " + "\n  ".join(broken) if broken else f"all {gates} passed"))
    return 1 if broken else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    steps = commands.add_parser("steps", help="step load with SLO gates against a running service")
    steps.add_argument("--url", default="http://127.0.0.1:8000")
    steps.add_argument("--slo", type=Path, default=ROOT / "loadtests" / "slo.toml")
    steps.add_argument("--out", type=Path)
    compare = commands.add_parser("compare", help="scenarios side by side (starts the service itself)")
    compare.add_argument("--url")
    compare.add_argument("--scenarios", nargs="+", default=["student", "fallback"])
    compare.add_argument("--users", type=int, default=64)
    compare.add_argument("--seconds", type=int, default=15)
    compare.add_argument("--threshold", type=float, default=0.7)
    args = parser.parse_args()
    return steps_main(args) if args.command == "steps" else compare_main(args)


def compare_main(args: argparse.Namespace) -> int:
    scenarios = {"student": {"SENTIMENT_TEACHER_ENABLED": "false", "SENTIMENT_FALLBACK": "never"},
                 "fallback": {"SENTIMENT_TEACHER_ENABLED": "true", "SENTIMENT_FALLBACK": "auto",
                              "SENTIMENT_FALLBACK_THRESHOLD": str(args.threshold)}}
    results = {}
    for name in args.scenarios:
        if name == "external":
            results[name] = run_locust(args.url, args.users, args.seconds)
            continue
        process, url = start_service(scenarios[name], teacher=True)
        try:
            results[name] = run_locust(url, args.users, args.seconds)
            if name == "fallback":
                results[name]["fallbacks"] = fallback_counts(url)
        finally:
            process.terminate()
            process.wait(timeout=20)
    print(json.dumps(results, indent=2, default=lambda v: round(v, 2)))
    print(f"\n{'scenario':10} {'req/s':>8} {'texts/s':>8} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} {'fail':>6}")
    for name, r in results.items():
        print(f"{name:10} {r['requests_per_s']:8.0f} {r['texts_per_s']:8.0f} {r['p50_ms']:8.0f} {r['p95_ms']:8.0f} "
              f"{r['p99_ms']:8.0f} {r['failures']:6d}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
