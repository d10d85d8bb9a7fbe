"""Property tests of the micro-batcher's invariants (hypothesis).

The batcher is generic over the function it batches; here that function is a pure one whose
output row encodes its input, so every caller can check it got exactly its own rows, in order.
"""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from service.batcher import Batcher
from service.errors import ErrorKind, ServiceError
from service.metrics import Metrics


class RecordingInfer:
    """Row i = (first id, length, sum of ids): unique per sequence in these tests. Records batch shapes."""

    def __init__(self, delay: float = 0.0, fail_when: int | None = None) -> None:
        self.batches: list[tuple[int, int]] = []
        self.delay, self.fail_when = delay, fail_when
        self.lock = threading.Lock()

    def __call__(self, sequences):
        with self.lock:
            self.batches.append((len(sequences), max(len(s) for s in sequences)))
        if self.delay:
            time.sleep(self.delay)
        if self.fail_when is not None and any(s[0] == self.fail_when for s in sequences):
            raise RuntimeError("boom")
        return np.array([[s[0], len(s), sum(s)] for s in sequences], dtype=np.float64)


def sequence(tag: int, length: int) -> list[int]:
    return [tag] + [1] * (length - 1)


requests_strategy = st.lists(st.lists(st.integers(min_value=1, max_value=40), min_size=1, max_size=6),
                             min_size=1, max_size=25)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(requests=requests_strategy, max_batch_size=st.integers(1, 8), max_batch_tokens=st.integers(8, 120),
       backlog_factor=st.sampled_from([0, 2, 3]), max_wait=st.sampled_from([0.0, 0.001, 0.003]),
       workers=st.integers(1, 2))
def test_every_caller_gets_its_own_rows_in_order_and_limits_hold(requests, max_batch_size, max_batch_tokens,
                                                                 backlog_factor, max_wait, workers) -> None:
    infer = RecordingInfer(delay=0.0005)
    most_tokens = max(max_batch_tokens, backlog_factor * max_batch_tokens)

    async def scenario() -> None:
        batcher = Batcher(infer, Metrics(), max_batch_size=max_batch_size, max_batch_tokens=max_batch_tokens,
                          backlog_batch_tokens=backlog_factor * max_batch_tokens, max_wait=max_wait,
                          queue_size=10_000, workers=workers)
        batcher.start()
        tag = iter(range(1000, 10**6))
        tagged = [[sequence(next(tag), length) for length in lengths] for lengths in requests]
        deadline = time.perf_counter() + 30
        results = await asyncio.gather(*(batcher.submit(seqs, deadline) for seqs in tagged))
        for seqs, rows in zip(tagged, results, strict=True):
            assert [int(row[0]) for row in rows] == [s[0] for s in seqs]
            assert [int(row[1]) for row in rows] == [len(s) for s in seqs]
        await batcher.close()

    asyncio.run(scenario())
    assert sum(size for size, _ in infer.batches) == sum(len(r) for r in requests)
    for size, width in infer.batches:
        assert 1 <= size <= max_batch_size
        assert size == 1 or size * width <= most_tokens


@settings(max_examples=30, deadline=None)
@given(queue_size=st.integers(1, 20), burst=st.integers(1, 40))
def test_a_full_queue_rejects_instead_of_growing(queue_size, burst) -> None:
    release = threading.Event()
    started = threading.Event()

    def infer(sequences):  # the first text holds the only stream until the burst is in
        started.set()
        release.wait(10)
        return [[s[0], len(s), sum(s)] for s in sequences]

    async def scenario() -> tuple[int, int]:
        batcher = Batcher(infer, Metrics(), max_batch_size=2, max_wait=0.0, queue_size=queue_size)
        batcher.start()
        deadline = time.perf_counter() + 30
        holding = asyncio.create_task(batcher.submit([[999, 2]], deadline))
        while not started.is_set():
            await asyncio.sleep(0.001)
        burst_tasks = [asyncio.create_task(batcher.submit([[i + 1, 2]], deadline)) for i in range(burst)]
        await asyncio.sleep(0.01)  # every submission is in (or refused) while the stream is held
        release.set()
        outcomes = await asyncio.gather(*burst_tasks, return_exceptions=True)
        await holding
        await batcher.close()
        rejected = [o for o in outcomes if isinstance(o, ServiceError)]
        assert all(e.kind is ErrorKind.OVERLOADED and e.retry_after for e in rejected)
        return burst - len(rejected), len(rejected)

    accepted, rejected = asyncio.run(scenario())
    # The stream is held, so nothing leaves the queue during the burst: exactly queue_size fit.
    assert accepted == min(burst, queue_size) and rejected == max(0, burst - queue_size)


def test_a_lone_request_pays_no_batching_delay() -> None:
    infer = RecordingInfer()

    async def scenario() -> float:
        batcher = Batcher(infer, Metrics(), max_wait=5.0)  # a huge wait would show if it were applied
        batcher.start()
        started = time.perf_counter()
        await batcher.submit([[7, 1, 1]], time.perf_counter() + 30)
        elapsed = time.perf_counter() - started
        await batcher.close()
        return elapsed

    assert asyncio.run(scenario()) < 1.0


def test_a_queue_that_fills_a_batch_by_tokens_does_not_wait_for_company() -> None:
    infer = RecordingInfer()

    async def scenario() -> float:
        # 4 texts of 4 tokens fill a 16-token batch, though far fewer than max_batch_size texts.
        batcher = Batcher(infer, Metrics(), max_batch_size=64, max_batch_tokens=16, max_wait=5.0)
        batcher.start()
        started = time.perf_counter()
        await batcher.submit([[7, 1, 1, i] for i in range(4)], time.perf_counter() + 30)
        elapsed = time.perf_counter() - started
        await batcher.close()
        return elapsed

    assert asyncio.run(scenario()) < 1.0
    assert infer.batches == [(4, 4)]  # one batch: 4 texts, 4 tokens wide


def test_batches_grow_to_the_backlog_budget_only_while_the_queue_is_deep() -> None:
    release = threading.Event()
    infer = RecordingInfer()

    def held(sequences):  # the first batch holds the only stream until the queue is filled
        if sequences[0][0] == 999:
            release.wait(10)
        return infer(sequences)

    async def scenario() -> None:
        batcher = Batcher(held, Metrics(), max_batch_size=64, max_batch_tokens=16, backlog_batch_tokens=32,
                          queue_size=100, workers=1)
        batcher.start()
        deadline = time.perf_counter() + 30
        holding = asyncio.create_task(batcher.submit([[999, 1, 1, 1]], deadline))
        while not infer.batches and not batcher._in_flight:
            await asyncio.sleep(0.001)
        # 20 texts of 4 tokens: 80 queued tokens, more than BACKLOG_BATCHES 16-token batches for the stream.
        queued = asyncio.create_task(batcher.submit([[i, 1, 1, 1] for i in range(20)], deadline))
        await asyncio.sleep(0.01)
        release.set()
        rows = await queued
        await holding
        assert [int(row[0]) for row in rows] == list(range(20))
        await batcher.close()

    asyncio.run(scenario())
    # Deep (80 >= 4 x 16 tokens): 8 texts, 32 tokens; then 48 are left, not deep: the normal budget.
    assert infer.batches == [(1, 4), (8, 4), (4, 4), (4, 4), (4, 4)]


def test_a_stream_whose_queue_another_stream_emptied_keeps_serving() -> None:
    infer = RecordingInfer(delay=0.1)

    async def scenario() -> list[bool]:
        batcher = Batcher(infer, Metrics(), max_batch_size=3, max_wait=2.0, workers=2)
        batcher.start()
        deadline = time.perf_counter() + 30
        first = asyncio.create_task(batcher.submit([[1, 1]], deadline))  # alone: runs at once
        await asyncio.sleep(0.01)
        rest = asyncio.create_task(batcher.submit([[2, 1], [3, 1]], deadline))  # the other stream waits
        await first
        await asyncio.sleep(0.01)  # now both streams wait for a third text
        await batcher.submit([[4, 1]], deadline)  # a stream takes its share, the other the rest
        await rest
        alive = [thread.is_alive() for thread in batcher._threads]
        await batcher.close()
        return alive

    assert asyncio.run(scenario()) == [True, True]


def test_a_failing_batch_fails_every_caller_in_it_and_the_next_batch_still_runs() -> None:
    infer = RecordingInfer(fail_when=666)

    async def scenario() -> None:
        batcher = Batcher(infer, Metrics(), max_batch_size=8, max_wait=0.01)
        batcher.start()
        deadline = time.perf_counter() + 30
        outcomes = await asyncio.gather(batcher.submit([[666, 1]], deadline), batcher.submit([[5, 1]], deadline),
                                        return_exceptions=True)
        assert all(isinstance(o, ServiceError) and o.kind is ErrorKind.INTERNAL for o in outcomes)
        rows = await batcher.submit([[9, 1]], deadline)
        assert int(rows[0][0]) == 9
        await batcher.close()

    asyncio.run(scenario())


def test_deadline_in_queue_and_shutdown_leave_no_caller_hanging() -> None:
    infer = RecordingInfer(delay=0.2)

    async def scenario() -> None:
        batcher = Batcher(infer, Metrics(), max_batch_size=1, max_wait=0.0)
        batcher.start()
        slow = asyncio.create_task(batcher.submit([[1, 1]], time.perf_counter() + 30))
        await asyncio.sleep(0.01)
        with pytest.raises(ServiceError) as info:
            await batcher.submit([[2, 1]], time.perf_counter() + 0.05)
        assert info.value.kind is ErrorKind.DEADLINE
        waiting = asyncio.create_task(batcher.submit([[3, 1]], time.perf_counter() + 30))
        await asyncio.sleep(0)
        await batcher.close(drain_timeout=0.0)
        for task in (slow, waiting):
            outcome = await asyncio.wait_for(asyncio.gather(task, return_exceptions=True), timeout=5)
            assert not isinstance(outcome[0], asyncio.CancelledError)

    asyncio.run(scenario())


def test_a_batch_alone_runs_on_the_alone_runner_and_concurrent_batches_on_the_streams() -> None:
    streams, alone = RecordingInfer(delay=0.02), RecordingInfer(delay=0.02)

    async def scenario() -> None:
        batcher = Batcher(streams, Metrics(), max_batch_size=1, max_wait=0.0, workers=2, infer_alone=alone)
        batcher.start()
        deadline = time.perf_counter() + 30
        rows = await batcher.submit([[4, 1, 1]], deadline)
        assert int(rows[0][0]) == 4 and alone.batches == [(1, 3)] and not streams.batches
        results = await asyncio.gather(*(batcher.submit([[10 + i, 1]], deadline) for i in range(6)))
        assert [int(r[0][0]) for r in results] == [10 + i for i in range(6)]
        await batcher.close()

    asyncio.run(scenario())
    # Six texts queued at once: the first batch saw others waiting, so none of them ran alone.
    assert len(alone.batches) == 1 and sum(size for size, _ in streams.batches) == 6


def test_no_batch_starts_while_a_batch_runs_alone_on_every_core() -> None:
    spans: list[tuple[str, float, float]] = []

    def timed(kind: str):
        def infer(sequences):
            started = time.perf_counter()
            time.sleep(0.1)
            spans.append((kind, started, time.perf_counter()))
            return [[seq[0], len(seq), sum(seq)] for seq in sequences]
        return infer

    async def scenario() -> None:
        batcher = Batcher(timed("stream"), Metrics(), max_batch_size=8, max_wait=0.0, workers=2,
                          infer_alone=timed("alone"))
        batcher.start()
        deadline = time.perf_counter() + 30
        first = asyncio.create_task(batcher.submit([[1, 1]], deadline))  # alone: every core
        await asyncio.sleep(0.02)
        second = await batcher.submit([[2, 1]], deadline)  # arrives while it runs: a free stream waits
        assert int(second[0][0]) == 2 and int((await first)[0][0]) == 1
        await batcher.close()

    asyncio.run(scenario())
    (kind, _, first_end), (_, second_start, _) = sorted(spans, key=lambda span: span[1])
    assert kind == "alone" and second_start >= first_end


def test_a_burst_is_shared_by_the_idle_streams_and_the_rest_does_not_wait_again() -> None:
    spans: list[tuple[int, float, float]] = []

    def infer(sequences):
        started = time.perf_counter()
        time.sleep(0.1)
        spans.append((len(sequences), started, time.perf_counter()))
        return [[seq[0], len(seq), sum(seq)] for seq in sequences]

    async def scenario() -> None:
        # 7 texts at once fill a batch by count; both streams are idle. A long max_wait shows that the
        # stream taking the rest does not wait for company again.
        batcher = Batcher(infer, Metrics(), max_batch_size=7, max_wait=5.0, workers=2)
        batcher.start()
        rows = await batcher.submit([[10 + i, 1] for i in range(7)], time.perf_counter() + 30)
        assert [int(row[0]) for row in rows] == [10 + i for i in range(7)]
        await batcher.close()

    asyncio.run(scenario())
    (first_size, _, first_end), (second_size, second_start, _) = sorted(spans, key=lambda span: span[1])
    assert (first_size, second_size) == (4, 3)  # the share rounds up: ceil(7 / 2 idle streams)
    assert second_start < first_end  # side by side, not one after the other


def test_a_caller_that_leaves_mid_batch_costs_the_others_nothing() -> None:
    infer = RecordingInfer(delay=0.1)

    async def scenario() -> None:
        batcher = Batcher(infer, Metrics(), max_batch_size=8, max_wait=0.01, workers=1)
        batcher.start()
        deadline = time.perf_counter() + 30
        leaving = asyncio.create_task(batcher.submit([[1, 1]], deadline))
        staying = asyncio.create_task(batcher.submit([[2, 1]], deadline))
        while not infer.batches:  # both are in the running batch
            await asyncio.sleep(0.005)
        leaving.cancel()
        assert [int(row[0]) for row in await staying] == [2]
        assert (await asyncio.gather(leaving, return_exceptions=True))[0].__class__ is asyncio.CancelledError
        assert [int(row[0]) for row in await batcher.submit([[3, 1]], deadline)] == [3]  # the stream serves on
        await batcher.close()

    asyncio.run(scenario())
    assert infer.batches[0] == (2, 2)  # the two shared one batch
