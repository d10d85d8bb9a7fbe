"""The student path's one owner: encode → batch → infer → post-process, with the layout it chose.

`Engine.started(...)` measures the layout for this machine (service/layout.py), warms the runner and
runs the batcher for the engine's lifetime. Requests call `encode`, then `infer`: tokenising happens here (inline
for ordinary requests, in a thread for large ones, so the event loop never stalls), and inference and
post-processing happen together in the batch's thread, so the loop only routes results. A batch
that runs alone (nothing queued, nothing running) gets a runner with every core: the layout serves
throughput under load, and a lone request still gets the lowest latency.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Sequence

from service.artifact import Artifact
from service.batcher import Batcher
from service.layout import Layout
from service.metrics import Metrics
from service.runner import ModelRunner, Prediction, choose_layout
from service.settings import Settings
from service.tokenization import Encoded

log = logging.getLogger("sentiment.engine")
# Above this many characters a request is tokenised off the event loop (~1 ms of tokenizer work).
INLINE_ENCODE_CHARS = 4_000


class Engine:
    def __init__(self, runner: ModelRunner, layout: Layout, batcher: Batcher, metrics: Metrics) -> None:
        self.runner, self.layout, self.batcher, self._metrics = runner, layout, batcher, metrics
        self._users = 0  # requests between their encode and their last result
        self._unused = asyncio.Event()
        self._unused.set()

    @contextlib.asynccontextmanager
    async def in_use(self) -> AsyncIterator[Engine]:
        """Held by a request for its whole encode → infer: a retiring engine waits for it (hot reload)."""
        self._users += 1
        self._unused.clear()
        try:
            yield self
        finally:
            self._users -= 1
            if not self._users:
                self._unused.set()

    async def _idle(self, timeout: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._unused.wait(), timeout)

    @classmethod
    @contextlib.asynccontextmanager
    async def started(cls, artifact: Artifact, settings: Settings, metrics: Metrics) -> AsyncIterator[Engine]:
        s = settings
        layout, runners = await asyncio.to_thread(choose_layout, artifact, s.layout, s.max_batch_tokens,
                                                   s.lone_spin, s.max_batch_ms, s.backlog_batch_tokens)
        log.info("layout chosen", extra={"layout": layout.shape, "batch_tokens": layout.batch_tokens,
                                         "backlog_batch_tokens": layout.backlog_tokens, "reason": layout.reason})
        warn_if_queue_outlasts_deadline(layout, s)
        runner, solo = runners[layout.threads], runners[max(runners)]
        for _ in range(max(1, s.warmup_rounds)):
            for warm in {id(r): r for r in (runner, solo)}.values():
                await asyncio.to_thread(warm.warm_up)
        batcher = Batcher(_finished(runner), metrics, max_batch_size=s.max_batch_size,
                          max_batch_tokens=layout.batch_tokens, backlog_batch_tokens=layout.backlog_tokens,
                          max_wait=s.max_wait_ms / 1000,
                          queue_size=s.queue_size, workers=layout.streams,
                          infer_alone=_finished(solo) if solo is not runner else None)
        batcher.start()
        engine = cls(runner, layout, batcher, metrics)
        try:
            yield engine
        finally:
            await engine._idle(s.request_timeout_s)
            await batcher.close()

    @property
    def depth(self) -> int:
        return self.batcher.depth

    async def encode(self, texts: Sequence[str]) -> list[Encoded]:
        """Token ids per text; texts the queue has no room for are refused first, not tokenised."""
        self.batcher.refuse_if_full(len(texts))
        with self._metrics.tokenize_duration.time():
            if sum(map(len, texts)) <= INLINE_ENCODE_CHARS:
                return self.runner.encode(texts)
            return await asyncio.to_thread(self.runner.encode, texts)

    async def infer(self, encoded: Sequence[Encoded], deadline: float) -> list[Prediction]:
        """The student's predictions, in order; ServiceError when the queue is full, past the deadline, or
        when inference fails (every text of a failed batch hears of it)."""
        return await self.batcher.submit([enc.ids for enc in encoded], deadline)


def warn_if_queue_outlasts_deadline(layout: Layout, settings: Settings) -> None:
    """Warn when a full queue holds more work than the deadline allows at the rate measured here: texts at
    its back then wait, time out (504) and used the queue for nothing, where a shorter queue refuses them
    at once (503 + Retry-After). Measured with the benchmarks' 4096-text queue, 1000 clients: 88
    timeouts a second against 38 answers; with 512, none (bench/overload.py)."""
    texts_per_s = layout.texts_per_s
    if texts_per_s and settings.queue_size / texts_per_s > settings.request_timeout_s:
        log.warning("queue deeper than the deadline", extra={
            "queue_size": settings.queue_size, "seconds_of_work": round(settings.queue_size / texts_per_s, 1),
            "request_timeout_s": settings.request_timeout_s,
            "advice": f"SENTIMENT_QUEUE_SIZE at most {int(texts_per_s * settings.request_timeout_s)} here "
                      "refuses what cannot be served in time instead of timing it out"})


def _finished(runner: ModelRunner) -> Callable[[Sequence[list[int]]], list[Prediction]]:
    """Inference and post-processing in one call, so both run in the batch's thread."""
    return lambda sequences: runner.predictions(runner.probabilities(sequences))
