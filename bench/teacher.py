"""Teacher latency per call, label-only vs explain, against the embedded teacher (or --url), one run.

  python bench/teacher.py [--calls 20] [--url http://127.0.0.1:8081 --model NAME]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.serving import MESSAGES
from service.teacher import TeacherClient
from service.teacher_process import EmbeddedTeacher


async def measure(client: TeacherClient, calls: int) -> dict[str, dict[str, float]]:
    out = {}
    for task in ("label", "explain"):
        ask = client.classify if task == "label" else client.explain
        answers = [await ask(MESSAGES[i % len(MESSAGES)], timeout=60) for i in range(calls)]
        seconds = sorted(a.seconds for a in answers)
        out[task] = {"p50_ms": statistics.median(seconds) * 1000, "p90_ms": seconds[int(0.9 * len(seconds))] * 1000,
                     "ok": sum(a.outcome == "ok" for a in answers), "calls": calls}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument("--url")
    parser.add_argument("--model", default="default")
    args = parser.parse_args()
    embedded = None if args.url else EmbeddedTeacher()
    if embedded:
        embedded.start()
    url, model = (embedded.url, embedded.model_name) if embedded else (args.url, args.model)

    async def run() -> dict:
        client = TeacherClient(url, model, constraint="gbnf" if embedded else "none", timeout=60)
        try:
            await client.classify("warm up")
            return await measure(client, args.calls)
        finally:
            await client.aclose()

    try:
        results = asyncio.run(run())
    finally:
        if embedded:
            embedded.stop()
    for task, r in results.items():
        print(f"{task:8} p50 {r['p50_ms']:7.0f} ms  p90 {r['p90_ms']:7.0f} ms  ok {r['ok']}/{r['calls']}")
    print(f"explain / label p50 ratio: {results['explain']['p50_ms'] / results['label']['p50_ms']:.1f}")


if __name__ == "__main__":
    main()
