"""The execution layout — inference streams × ONNX Runtime threads, and the largest batch worth forming —
chosen by measuring the served model on the machine that serves it, during warm-up.

Why measured, not configured: on an AVX2-only EPYC one stream of two threads with batches of 8 served
best; on an AVX-512-VNNI Xeon two streams of one thread at batch 1 did (there, padding a batch to its
longest text cost more than batching saved). A default measured on one CPU is wrong on another.
"""

from __future__ import annotations

import math
import os
import random
import statistics
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

BATCH_SIZES = (1, 2, 4, 8, 16)
# A candidate within this share of the best throughput counts as equal: the machine is noisy, and the
# smaller batch (and the wider stream) then wins on latency.
NOISE_MARGIN = 0.05


class Runs(Protocol):
    def logits(self, sequences: Sequence[list[int]]) -> object: ...


@dataclass(frozen=True)
class Layout:
    streams: int
    threads: int
    max_batch_size: int
    reason: str = "configured"
    measured: dict[str, float] = field(default_factory=dict)  # "2x1 b8" -> texts/s

    @property
    def shape(self) -> str:
        return f"{self.streams}x{self.threads}"

    def to_json(self) -> dict[str, object]:
        return {"streams": self.streams, "threads": self.threads, "max_batch_size": self.max_batch_size,
                "reason": self.reason, "measured_texts_per_s": {k: round(v, 1) for k, v in self.measured.items()}}


def parse_shape(value: str) -> tuple[int, int] | None:
    """'auto' -> None (measure); 'SxT' -> (streams, threads); anything else is a ValueError."""
    if value == "auto":
        return None
    try:
        streams, threads = (int(part) for part in value.lower().split("x"))
    except ValueError:
        raise ValueError(f"layout must be 'auto' or STREAMSxTHREADS such as 2x1, not {value!r}") from None
    if streams < 1 or threads < 1:
        raise ValueError(f"layout {value!r}: streams and threads must be at least 1")
    return streams, threads


def available_cores() -> int:
    """Cores this process may use: its CPU affinity, capped by a cgroup v2 CPU quota (containers)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        if quota != "max":
            cores = min(cores, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return cores


def candidate_shapes(cores: int) -> list[tuple[int, int]]:
    """Every (streams, threads) that uses each core once: 1×N, N×1 and the splits in between."""
    cores = max(1, cores)
    return [(cores // threads, threads) for threads in range(cores, 0, -1) if cores % threads == 0]


def calibration_sequences(pad_id: int, vocab_size: int, count: int = 96, seed: int = 0) -> list[list[int]]:
    """Token sequences with the lengths of short customer messages (10–60 tokens). ONNX Runtime's cost
    does not depend on which ids they hold, only on how many."""
    rng = random.Random(seed)
    low = min(1000, vocab_size // 2)
    return [[rng.randrange(low, vocab_size) for _ in range(rng.randint(10, 60))] for _ in range(count)]


def throughput(run: Callable[[list[list[int]]], object], streams: int, sequences: list[list[int]], batch: int,
               seconds: float) -> float:
    """Texts/s with `streams` threads each running batches of `batch` neighbouring-length sequences, as
    the batcher fills them under load."""
    ordered = sorted(sequences, key=len)
    chunks = [ordered[i:i + batch] for i in range(0, len(ordered) - batch + 1, batch)]
    done = [0] * streams
    until = time.perf_counter() + seconds

    def stream(k: int) -> None:
        i = k
        while time.perf_counter() < until:
            chunk = chunks[i % len(chunks)]
            run(chunk)
            done[k] += len(chunk)
            i += streams

    started = time.perf_counter()
    workers = [threading.Thread(target=stream, args=(k,)) for k in range(streams)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return sum(done) / (time.perf_counter() - started)


def calibrate(runners: dict[int, Runs], shapes: list[tuple[int, int]], sequences: list[list[int]],
              batch_sizes: Sequence[int] = BATCH_SIZES, seconds: float = 0.1, rounds: int = 3) -> Layout:
    """Measure every shape × batch size (`runners` maps a thread count to a runner with that many ORT
    threads), rounds interleaved against drift, keep the median of each, and choose from those."""
    samples: dict[tuple[int, int, int], list[float]] = {}
    for _ in range(rounds):
        for streams, threads in shapes:
            for batch in batch_sizes:
                samples.setdefault((streams, threads, batch), []).append(
                    throughput(runners[threads].logits, streams, sequences, batch, seconds))
    return choose({key: statistics.median(values) for key, values in samples.items()})


def choose(measured: dict[tuple[int, int, int], float]) -> Layout:
    """The fastest (streams, threads, batch), except that within NOISE_MARGIN of it the smallest batch
    wins, then the most threads per stream: both answer a lone request sooner."""
    best_key = max(measured, key=measured.__getitem__)
    best = measured[best_key]
    near = [key for key, value in measured.items() if value >= (1 - NOISE_MARGIN) * best]
    key = min(near, key=lambda k: (k[2], -k[1]))
    streams, threads, batch = key
    reason = f"{streams}x{threads} up to batch {batch}: {measured[key]:.0f} texts/s measured here"
    if key != best_key:
        reason += (f", within {NOISE_MARGIN:.0%} of the fastest ({best_key[0]}x{best_key[1]} batch {best_key[2]}:"
                   f" {best:.0f}) with less waiting")
    return Layout(streams, threads, batch, reason, {f"{s}x{t} b{b}": v for (s, t, b), v in sorted(measured.items())})
