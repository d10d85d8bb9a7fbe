"""Every Prometheus metric of the service, with its buckets chosen once.

Labels are bounded: route templates, status codes, the three sentiment labels, fixed reason and
outcome sets. No message text ever becomes a label value. Each app gets its own registry, so two
apps in one process (tests) never collide.
"""

from __future__ import annotations

import contextlib
import gc
import time
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

LATENCY_BUCKETS = (0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15,
                   0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
TEACHER_BUCKETS = (0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 20.0, 30.0)
SIZE_BUCKETS = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64)
TOKEN_BUCKETS = (8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)
GC_BUCKETS = (0.0001, 0.0003, 0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0)
CONFIDENCE_BUCKETS = (0.35, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0)


class Metrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        p = "sentiment_"
        self.request_duration = Histogram(f"{p}request_duration_seconds", "HTTP request latency",
                                          ["route", "method", "status"], buckets=LATENCY_BUCKETS, registry=r)
        self.queue_wait = Histogram(f"{p}queue_wait_seconds", "time a text waited for its batch",
                                    buckets=LATENCY_BUCKETS, registry=r)
        self.tokenize_duration = Histogram(f"{p}tokenize_duration_seconds", "tokenisation time per request",
                                           buckets=LATENCY_BUCKETS, registry=r)
        self.inference_duration = Histogram(f"{p}inference_duration_seconds", "ONNX Runtime time per batch",
                                            buckets=LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram(f"{p}batch_size", "texts per inference batch", buckets=SIZE_BUCKETS,
                                    registry=r)
        self.batch_tokens = Histogram(f"{p}batch_tokens", "padded tokens per inference batch",
                                      buckets=TOKEN_BUCKETS, registry=r)
        self.input_tokens = Histogram(f"{p}input_tokens", "tokens per text after truncation",
                                      buckets=TOKEN_BUCKETS, registry=r)
        self.queue_depth = Gauge(f"{p}queue_depth", "texts waiting for inference", registry=r)
        self.queue_capacity = Gauge(f"{p}queue_capacity", "texts the queue holds before 503 (SENTIMENT_QUEUE_SIZE)",
                                    registry=r)
        self.rejected = Counter(f"{p}rejected_total", "texts refused or dropped before inference",
                                ["reason"], registry=r)
        self.predictions = Counter(f"{p}predictions_total", "results returned", ["label", "source"], registry=r)
        self.confidence = Histogram(f"{p}confidence", "student top probability", buckets=CONFIDENCE_BUCKETS,
                                    registry=r)
        self.truncations = Counter(f"{p}truncations_total", "texts cut to the model's max tokens", registry=r)
        self.fallbacks = Counter(f"{p}fallbacks_total", "teacher fallbacks", ["reason", "outcome"], registry=r)
        self.teacher_duration = Histogram(f"{p}teacher_duration_seconds", "teacher call latency", ["task"],
                                          buckets=TEACHER_BUCKETS, registry=r)
        self.teacher_errors = Counter(f"{p}teacher_errors_total", "failed teacher calls", ["task", "outcome"],
                                      registry=r)
        self.breaker_state = Gauge(f"{p}teacher_breaker_state", "0 closed, 1 half-open, 2 open", registry=r)
        self.teacher_enabled = Gauge(f"{p}teacher_enabled", "1 when a teacher is wanted (SENTIMENT_TEACHER_ENABLED)",
                                     registry=r)
        self.teacher_up = Gauge(f"{p}teacher_up", "1 while the embedded teacher answers (external: always 1)",
                                registry=r)
        self.teacher_restarts = Counter(f"{p}teacher_restarts_total", "embedded teacher restarts after a crash or hang",
                                        registry=r)
        self.budget_rejections = Counter(f"{p}teacher_budget_rejections_total",
                                         "fallbacks refused by the teacher budget", ["limit"], registry=r)
        self.hard_cases = Counter(f"{p}hard_cases_total", "hard-case log entries by outcome (written, disk, backlog)",
                                  ["outcome"], registry=r)
        self.client_disconnects = Counter(f"{p}client_disconnects_total",
                                          "requests cancelled because the client hung up before the answer",
                                          registry=r)
        self.aspect_predictions = Counter(f"{p}aspect_predictions_total",
                                          "aspect opinions returned, by taxonomy aspect and label",
                                          ["aspect", "label"], registry=r)
        self.aspect_duration = Histogram(f"{p}aspect_locate_seconds",
                                         "clause split and sentence encoding per request asking for aspects",
                                         buckets=LATENCY_BUCKETS, registry=r)
        self.gc_pause = Histogram(f"{p}gc_pause_seconds", "cyclic garbage collections, by generation: the "
                                  "event loop waits while one runs", ["generation"], buckets=GC_BUCKETS, registry=r)
        self.ready = Gauge(f"{p}ready", "1 when the model is loaded and warmed", registry=r)
        self.model_info = Info(f"{p}model", "the served model", registry=r)

    @contextlib.contextmanager
    def observing_gc(self) -> Iterator[None]:
        """Every collection of the cyclic garbage collector timed into `gc_pause_seconds` while open. A full
        collection of the start-up heap stopped the loop for 85-120 ms (service.scoring.settle_heap); this
        shows a dashboard whether pauses like it are back."""
        by_generation = [self.gc_pause.labels(str(generation)) for generation in range(3)]
        started = 0.0

        def on_collection(phase: str, info: dict[str, int]) -> None:
            nonlocal started
            if phase == "start":
                started = time.perf_counter()
            else:
                by_generation[info["generation"]].observe(time.perf_counter() - started)

        gc.callbacks.append(on_collection)
        try:
            yield
        finally:
            gc.callbacks.remove(on_collection)
