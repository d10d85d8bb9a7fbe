"""Locust load test, headless, against the real service; scenarios side by side in one run.

  python loadtests/run.py                       # starts the service itself (student only, then auto fallback)
  python loadtests/run.py --url http://host:8000 --scenarios external
  python loadtests/run.py --users 64 --seconds 30

Scenarios: `student` (fallback never), `fallback` (auto at --threshold with the embedded teacher),
`external` (whatever runs at --url). Prints texts/s, p50/p95/p99 and failures from Locust's --json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.launch import start_service  # noqa: E402


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url")
    parser.add_argument("--scenarios", nargs="+", default=["student", "fallback"])
    parser.add_argument("--users", type=int, default=64)
    parser.add_argument("--seconds", type=int, default=15)
    parser.add_argument("--threshold", type=float, default=0.7)
    args = parser.parse_args()
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


if __name__ == "__main__":
    main()
