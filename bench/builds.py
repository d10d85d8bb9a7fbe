"""Two or more ONNX builds of the student side by side in-process: one text, a batch of 8 and a batch of 32
of the load test's messages, per build, each time as a ratio to the first build.

  python bench/builds.py A.onnx B.onnx [...] [--threads 1] [--rounds 5]

Why it exists: a new export (static against dynamic activation ranges, another mixed-precision plan) has
to show it costs no speed before it replaces the committed model. The builds are visited in turn within
every round, so a noisy neighbour slows them all alike; the figure per shape is the median over rounds
of each round's median.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from loadtests.messages import MESSAGES
from service.runner import cpu_session
from service.settings import DEFAULT_MODEL_DIR
from service.tokenization import TextEncoder

SHAPES = {1: 60, 8: 12, 32: 4}  # texts per call: calls per round


def median_call_ms(session: ort.InferenceSession, feed: dict[str, np.ndarray], calls: int) -> float:
    session.run(None, feed)
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        session.run(None, feed)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def compare(builds: list[Path], threads: int, rounds: int) -> dict[Path, dict[int, float]]:
    """Per build and batch size, the median over rounds of each round's median call time (ms)."""
    encoder = TextEncoder(DEFAULT_MODEL_DIR / "tokenizer.json", 256, 64)
    sessions = {build: cpu_session(build, threads) for build in builds}
    shaped = {build: {n: encoder.feeds([enc.ids for enc in encoder.encode((MESSAGES * 3)[:n])],
                                       {i.name for i in session.get_inputs()}) for n in SHAPES}
              for build, session in sessions.items()}
    times: dict[Path, dict[int, list[float]]] = {build: {n: [] for n in SHAPES} for build in builds}
    for _ in range(rounds):
        for build, session in sessions.items():
            for n, calls in SHAPES.items():
                times[build][n].append(median_call_ms(session, shaped[build][n], calls))
    return {build: {n: statistics.median(values) for n, values in by_size.items()} for build, by_size in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("builds", nargs="+", type=Path)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    result = compare(args.builds, args.threads, args.rounds)
    first = result[args.builds[0]]
    print(f"{args.threads} thread(s), {args.rounds} interleaved rounds; ratio = first build's time / this one's")
    for build, by_size in result.items():
        cells = "  ".join(f"batch {n}: {ms:7.2f} ms ({first[n] / ms:.2f}x)" for n, ms in by_size.items())
        print(f"{build!s:<40} {cells}")


if __name__ == "__main__":
    main()
