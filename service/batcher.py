"""Dynamic micro-batching: texts of concurrent requests share one inference call.

Invariants (checked by tests/test_batcher.py):
- a batch holds at least 1 and at most `max_batch_size` texts, and at most `max_batch_tokens`
  padded tokens (texts x longest) unless a single text alone exceeds the budget; while the queue
  holds BACKLOG_BATCHES full batches for every stream, the budget is `backlog_batch_tokens` instead
  (where larger): every queued text waits for whole batches anyway, and fewer, larger batches clear
  the queue sooner (README, Execution layout);
- the oldest pending text is always in the next batch (no starvation); the rest of the batch is
  filled with the pending texts closest to it in length, so little compute goes to padding;
- a batch waits at most `max_wait` for company, and not at all when its text is the only one
  pending and no other batch is running (a lone request pays no batching delay; such a batch runs
  on `infer_alone`, all cores on one call, where one is given, and no other batch starts until it
  ends: its cores are taken) or when the queue already fills a batch (a backlog under load: waiting
  would only leave the cores idle);
- pending work is shared among the idle streams: a batch takes at most its share (pending texts / idle
  streams, rounded up), and the rest starts on the next idle stream without waiting again, so a burst
  runs as two half batches side by side instead of one whole batch beside an idle stream;
- admission is bounded: a request whose texts do not fit in the queue is refused at once;
- every submitted future is resolved: with its own row, with the batch's error when inference
  raises, or with a deadline / shutdown error. Callers that went away are skipped and counted.

Each stream is a thread that takes its own next batch the moment its last one ends, under one lock
shared with `submit`; the event loop only queues texts and resolves futures. (Streams driven from the
loop waited for it between batches: at 64 clients the gap between two batches of a stream was 2.6-2.8 ms
(median) against 0.24-0.28 ms now, and 0.14 of the 2 cores sat idle with a full queue against 0.06 now;
bench/breakdown.py.)
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from service.errors import ErrorKind, ServiceError
from service.metrics import Metrics

# Batches queued per stream (in tokens, at the normal budget) from which batches grow to the backlog budget.
# Four, not fewer: on an AVX2 Zen 3 the open-loop p99 at 290/s (0.75 of capacity) was 81-82 ms at four
# against 116-159 at two and 154-164 with no growth (two runs of bench/rates.py), and 64 clients were
# served as much (README, Execution layout).
BACKLOG_BATCHES = 4
# Token id sequences in, one result row per sequence out (probabilities, or finished predictions).
InferFn = Callable[[Sequence[list[int]]], Sequence[Any]]


@dataclass
class _Item:
    ids: list[int]
    future: asyncio.Future[Any]
    deadline: float
    enqueued: float = field(default_factory=time.perf_counter)


class Batcher:
    def __init__(self, infer: InferFn, metrics: Metrics, *, max_batch_size: int = 32,
                 max_batch_tokens: int = 8192, backlog_batch_tokens: int = 0, max_wait: float = 0.0,
                 queue_size: int = 512, workers: int = 1, infer_alone: InferFn | None = None) -> None:
        self._infer, self._infer_alone = infer, infer_alone or infer
        self._metrics = metrics
        self.max_batch_size, self.max_batch_tokens = max_batch_size, max_batch_tokens
        self.backlog_batch_tokens = backlog_batch_tokens
        self.max_wait, self.queue_size, self.workers = max_wait, queue_size, workers
        metrics.queue_capacity.set(queue_size)
        # Shared by the event loop and the streams, guarded by `_state`:
        self._state = threading.Condition()
        self._pending: list[_Item] = []
        self._in_flight: list[list[_Item]] = []  # the batches in inference now
        self._rest_ready = False  # a batch left texts for the other idle streams: they start without waiting
        self._alone = False  # a batch runs on `infer_alone`: its cores are taken, no other batch starts
        self._stopped = False
        self._closing = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._threads: list[threading.Thread] = []

    @property
    def depth(self) -> int:
        return len(self._pending)

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._threads = [threading.Thread(target=self._stream, name=f"inference-{i}", daemon=True)
                         for i in range(self.workers)]
        for thread in self._threads:
            thread.start()

    def refuse_if_full(self, count: int) -> None:
        """A 503 now for `count` texts the queue has no room for, before the request spends more on them
        (`submit` checks again under the lock)."""
        if (queued := len(self._pending)) + count > self.queue_size:
            self._refuse(count, queued)

    def _refuse(self, count: int, queued: int) -> None:
        self._metrics.rejected.labels("queue_full").inc(count)
        raise ServiceError(ErrorKind.OVERLOADED, "inference queue is full, retry shortly",
                           {"queue_size": self.queue_size, "queued": queued}, retry_after=1)

    async def submit(self, sequences: Sequence[list[int]], deadline: float) -> list[Any]:
        """Queue the texts of one request; their result rows come back in the same order."""
        if self._closing:
            raise ServiceError(ErrorKind.NOT_READY, "service is shutting down", retry_after=1)
        loop = asyncio.get_running_loop()
        items = [_Item(list(ids), loop.create_future(), deadline) for ids in sequences]
        with self._state:
            queued = len(self._pending)
            if queued + len(items) <= self.queue_size:
                self._pending.extend(items)
                self._state.notify_all()
        if queued + len(items) > self.queue_size:
            self._refuse(len(items), queued)
        self._metrics.queue_depth.set(queued + len(items))
        try:
            async with asyncio.timeout(max(0.0, deadline - time.perf_counter())):  # no extra task, unlike wait_for
                return [await item.future for item in items]
        except TimeoutError:
            raise ServiceError(ErrorKind.DEADLINE, "request deadline exceeded before inference finished") from None
        finally:  # gone early (deadline, hang-up, a failed batch): the batcher skips what is cancelled
            for item in items:
                if not item.future.done():
                    item.future.cancel()
                elif not item.future.cancelled():
                    item.future.exception()  # retrieved, so a failed batch is not logged once per text

    def _stream(self) -> None:
        """One stream's thread: take a batch, run it, hand its rows to the loop, until stopped."""
        while (work := self._next_batch()) is not None:
            batch, infer = work
            rows, error = self._run(batch, infer)
            with self._state:
                self._in_flight = [running for running in self._in_flight if running is not batch]
                self._alone = False
                self._state.notify_all()
            self._on_loop(self._deliver, batch, rows, error)

    def _next_batch(self) -> tuple[list[_Item], InferFn] | None:
        """Wait for work (and, unless alone, up to `max_wait` for company), then take a batch; None once
        stopped."""
        with self._state:
            while not self._stopped:
                if not self._pending:
                    self._state.wait()
                    continue
                alone = len(self._pending) == 1 and not self._in_flight
                if not alone and self.max_wait > 0:
                    until = time.perf_counter() + self.max_wait
                    while not (self._stopped or self._fills_a_batch()) and (left := until - time.perf_counter()) > 0:
                        self._state.wait(left)
                # A batch alone on every core: starting another beside it would only oversubscribe them
                # (open loop at 450 requests/s on 2 cores: p99 185 ms with, 77-87 ms without).
                while self._alone and not self._stopped:
                    self._state.wait()
                batch = [] if self._stopped else self._take_batch()
                if batch:
                    self._alone = self._infer_alone is not self._infer and not self._in_flight and not self._pending
                    self._in_flight.append(batch)
                    return batch, self._infer_alone if self._alone else self._infer
        return None

    def _fills_a_batch(self) -> bool:
        """Enough is queued for a full batch: by count, or by padded tokens at the oldest text's width, or
        another stream took its share and left the rest to this one. (Without the token test a backlog
        of short texts waited `max_wait` before every batch: the cores idled 10% of the time at 64 clients.)"""
        pending = self._pending
        if not pending or self._rest_ready:  # taken by another stream, or left for this one: go now
            return True
        return len(pending) >= self.max_batch_size or len(pending) * len(pending[0].ids) >= self.max_batch_tokens

    def _take_batch(self) -> list[_Item]:
        """The oldest live item plus the live items closest to it in length, within both limits. Called
        with `_state` held."""
        now = time.perf_counter()
        live, expired = [], []
        for item in self._pending:
            if item.future.done():  # caller gave up (deadline or disconnect)
                self._metrics.rejected.labels("cancelled").inc()
            elif item.deadline <= now:
                self._metrics.rejected.labels("deadline").inc()
                expired.append(item)
            else:
                live.append(item)
        if expired:
            self._on_loop(self._fail, expired, ServiceError(ErrorKind.DEADLINE, "request deadline exceeded in queue"))
        self._pending = live
        if not live:
            self._metrics.queue_depth.set(0)
            return []
        anchor, rest = live[0], live[1:]
        width = len(anchor.ids)
        budget = self._budget(live)
        rest.sort(key=lambda item: abs(len(item.ids) - width))
        idle = max(1, self.workers - len(self._in_flight))  # this stream included
        share = min(self.max_batch_size, -(-len(live) // idle))
        batch = [anchor]
        for item in rest:
            if len(batch) >= share:
                break
            if max(width, len(item.ids)) * (len(batch) + 1) > budget:
                continue
            width = max(width, len(item.ids))
            batch.append(item)
        chosen = {id(item) for item in batch}
        self._pending = [item for item in live if id(item) not in chosen]
        self._rest_ready = bool(self._pending) and idle > 1
        if self._rest_ready:
            self._state.notify_all()  # wakes a stream waiting for company: its batch is ready
        self._metrics.queue_depth.set(len(self._pending))
        return batch

    def _budget(self, live: list[_Item]) -> int:
        """Padded tokens the next batch may hold: the backlog budget once the queue holds BACKLOG_BATCHES
        batches for every stream."""
        if self.backlog_batch_tokens <= self.max_batch_tokens:
            return self.max_batch_tokens
        deep = BACKLOG_BATCHES * self.workers * self.max_batch_tokens
        return self.backlog_batch_tokens if sum(len(item.ids) for item in live) >= deep else self.max_batch_tokens

    def _run(self, batch: list[_Item], infer: InferFn) -> tuple[Sequence[Any], ServiceError | None]:
        """Inference on this stream's thread: the rows, or the error every caller in the batch hears."""
        started = time.perf_counter()
        for item in batch:
            self._metrics.queue_wait.observe(started - item.enqueued)
        self._metrics.batch_size.observe(len(batch))
        self._metrics.batch_tokens.observe(len(batch) * max(len(item.ids) for item in batch))
        try:
            rows = infer([item.ids for item in batch])
            if len(rows) != len(batch):
                raise RuntimeError(f"inference returned {len(rows)} rows for {len(batch)} texts")
            return rows, None
        except Exception as exc:  # every waiting caller must hear about it
            return [], ServiceError(ErrorKind.INTERNAL, "inference failed", {"error_type": type(exc).__name__})
        finally:
            self._metrics.inference_duration.observe(time.perf_counter() - started)

    def _on_loop(self, callback: Callable[..., None], *args: Any) -> None:
        """Run `callback` on the event loop (asyncio futures are resolved there only)."""
        assert self._loop is not None
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is left waiting
            self._loop.call_soon_threadsafe(callback, *args)

    @classmethod
    def _deliver(cls, batch: list[_Item], rows: Sequence[Any], error: ServiceError | None) -> None:
        if error is not None:
            cls._fail(batch, error)
            return
        for item, row in zip(batch, rows, strict=True):
            if not item.future.done():
                item.future.set_result(row)

    @staticmethod
    def _fail(items: list[_Item], error: ServiceError) -> None:
        for item in items:
            if not item.future.done():
                item.future.set_exception(error)

    async def close(self, drain_timeout: float = 5.0) -> None:
        """Stop admitting, let queued work finish (bounded), then fail whatever is left: queued, or in a
        batch still running (its rows, should they come, find their callers answered)."""
        self._closing = True
        until = time.perf_counter() + drain_timeout
        while (self._pending or self._in_flight) and time.perf_counter() < until:
            await asyncio.sleep(0.01)
        with self._state:
            self._stopped = True
            left = self._pending + [item for batch in self._in_flight for item in batch]
            self._pending = []
            self._state.notify_all()
        self._metrics.queue_depth.set(0)
        self._fail(left, ServiceError(ErrorKind.NOT_READY, "service shut down", retry_after=1))
