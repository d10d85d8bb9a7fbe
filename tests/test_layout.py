"""The execution layout: parsed from settings, or measured on this machine and reported."""

from __future__ import annotations

import contextlib
import logging
import statistics
import threading
import time
from collections import Counter

import pytest

from service.artifact import load_artifact
from service.engine import warn_if_queue_outlasts_deadline
from service.layout import (
    TOKEN_BUDGETS,
    Layout,
    available_cores,
    calibrate,
    calibration_sequences,
    candidate_shapes,
    choose,
    pack,
    parse_shape,
    throughput,
)
from service.runner import SPIN_US, ModelRunner, choose_layout
from service.settings import Settings
from tests.conftest import running_service


@pytest.mark.parametrize(("value", "shape"), [("auto", None), ("2x1", (2, 1)), ("1X2", (1, 2)), ("4x4", (4, 4))])
def test_layout_setting_parses(value, shape) -> None:
    assert parse_shape(value) == shape


@pytest.mark.parametrize("value", ["", "2", "2x", "x1", "0x2", "2x0", "twoxone", "-1x2"])
def test_a_bad_layout_setting_stops_the_start_with_its_name(value) -> None:
    with pytest.raises(ValueError, match="layout"):
        Settings.from_env({"SENTIMENT_LAYOUT": value})


@pytest.mark.parametrize(("cores", "shapes"), [(1, [(1, 1)]), (2, [(1, 2), (2, 1)]),
                                               (6, [(1, 6), (2, 3), (3, 2), (6, 1)])])
def test_candidate_shapes_use_every_core_once(cores, shapes) -> None:
    assert candidate_shapes(cores) == shapes


def test_the_fastest_wins_unless_more_streams_are_as_fast() -> None:
    measured = {(1, 2, 64): 300.0, (1, 2, 256): 500.0, (2, 1, 64): 390.0, (2, 1, 128): 470.0, (2, 1, 512): 480.0}
    layout = choose(measured)  # 2x1@512 is within 5% of 1x2@256: more streams, and the fastest of those
    assert (layout.shape, layout.batch_tokens) == ("2x1", 512)
    assert layout.reason == ("2x1, batches up to 512 tokens: 480 texts/s measured here, within 5% of the "
                             "fastest (1x2, 256 tokens: 500)")
    measured[(2, 1, 128)] = 481.0  # among as many streams no budget is preferred: the faster wins
    assert (choose(measured).shape, choose(measured).batch_tokens) == ("2x1", 128)
    measured = {(1, 2, 256): 500.0, (2, 1, 128): 470.0}  # more than 5% apart: the fastest, one stream or not
    layout = choose(measured)
    assert (layout.shape, layout.batch_tokens) == ("1x2", 256)
    assert layout.reason == "1x2, batches up to 256 tokens: 500 texts/s measured here"


def test_batches_that_take_too_long_here_are_left_out() -> None:
    measured = {(2, 1, 32): 350.0, (2, 1, 64): 420.0, (2, 1, 128): 430.0, (1, 2, 64): 300.0}
    batch_ms = {(2, 1, 32): 9.0, (2, 1, 64): 14.0, (2, 1, 128): 31.0, (1, 2, 64): 8.0}
    assert (choose(measured, batch_ms).shape, choose(measured, batch_ms).batch_tokens) == ("2x1", 128)  # no bound
    layout = choose(measured, batch_ms, max_batch_ms=10)  # 2x1 with 32 tokens is the fastest that fits
    assert (layout.shape, layout.batch_tokens) == ("2x1", 32)
    assert layout.reason == ("2x1, batches up to 32 tokens: 350 texts/s measured here, 9.0 ms a batch; batches "
                             "of up to 10 ms only (SENTIMENT_MAX_BATCH_MS): the fastest overall, 2x1 with 128 "
                             "tokens (430 texts/s), takes 31.0 ms a batch")
    assert layout.batch_ms["2x1 t128"] == 31.0 and layout.to_json()["measured_batch_ms"]["2x1 t32"] == 9.0
    layout = choose(measured, batch_ms, max_batch_ms=5)  # nothing that quick: the smallest budget
    assert (layout.shape, layout.batch_tokens) == ("2x1", 32)
    assert choose(measured, batch_ms, max_batch_ms=40).batch_tokens == 128  # all fit: the fastest


def test_a_deep_queue_gets_twice_the_budget_where_only_the_bound_kept_it_out() -> None:
    measured = {(2, 1, 32): 350.0, (2, 1, 64): 420.0, (2, 1, 128): 430.0, (2, 1, 256): 400.0}
    batch_ms = {(2, 1, 32): 9.0, (2, 1, 64): 17.0, (2, 1, 128): 35.0, (2, 1, 256): 75.0}
    layout = choose(measured, batch_ms, max_batch_ms=25)
    assert (layout.batch_tokens, layout.backlog_tokens) == (64, 128)
    assert layout.backlog_reason == "up to 128 tokens from a deep queue: 430 texts/s, 35.0 ms a batch"
    assert layout.to_json()["backlog_batch_tokens"] == 128
    assert choose(measured, batch_ms, max_batch_ms=17).backlog_tokens == 0  # 35 ms is over twice 17
    assert choose(measured, batch_ms).backlog_tokens == 0  # no bound: the budget is already the fastest
    slower = {**measured, (2, 1, 128): 390.0}  # beyond the noise margin below 64 tokens' 420
    layout = choose(slower, batch_ms, max_batch_ms=25)
    assert layout.backlog_tokens == 0 and "slower" in layout.backlog_reason


def test_pack_respects_the_token_budget_and_keeps_every_sequence() -> None:
    sequences = calibration_sequences(30522)
    assert all(6 <= len(seq) <= 64 for seq in sequences)
    for budget in TOKEN_BUDGETS:
        batches = pack(sequences, budget)
        assert sorted(map(len, (s for b in batches for s in b))) == sorted(map(len, sequences))
        assert all(len(b) == 1 or len(b) * max(map(len, b)) <= budget for b in batches)


def test_throughput_runs_every_stream_and_counts_texts() -> None:
    calls: list[int] = []
    batches = [[[1] * 5] * 4] * 3
    rate = throughput(lambda batch: calls.append(len(batch)), streams=2, batches=batches, seconds=0.05)
    assert calls and set(calls) == {4} and rate > 0


def test_throughput_runs_every_batch_on_every_stream_however_short_the_time() -> None:
    ran: Counter[int] = Counter()
    lock = threading.Lock()

    def run(batch: list[list[int]]) -> None:
        with lock:
            ran[len(batch[0])] += 1

    batches = [[[1] * width] for width in range(1, 8)]  # sorted by length, as `pack` leaves them
    assert throughput(run, streams=2, batches=batches) > 0
    assert ran == {width: 2 for width in range(1, 8)}  # the long ones too, not only the first few


class PaddedTokenCost:
    """A runner whose batch costs a fixed time per padded token, as ONNX Runtime's roughly does."""

    def __init__(self, ms_per_token: float, slow_calls: int = 0) -> None:
        self.ms_per_token, self.slow_calls = ms_per_token, slow_calls  # the first calls take twice as long

    def logits(self, sequences) -> None:
        slowed = 2 if self.slow_calls > 0 else 1
        self.slow_calls -= 1
        time.sleep(len(sequences) * max(map(len, sequences)) * self.ms_per_token * slowed / 1000)


def test_calibration_times_the_whole_length_mix() -> None:
    sequences = calibration_sequences(30522)
    expected = statistics.mean(len(b) * max(map(len, b)) for b in pack(sequences, 64)) * 0.3  # ms a batch
    layout = calibrate({1: PaddedTokenCost(0.3)}, [(1, 1)], sequences, budgets=(64,), rounds=1)
    # Timing only the first (shortest) batches would report about half of this.
    assert 0.9 * expected <= layout.batch_ms["1x1 t64"] <= 1.5 * expected


def test_the_batch_time_bound_reads_the_quickest_round() -> None:
    sequences = calibration_sequences(30522)[:12]
    batches = len(pack(sequences, 64))
    expected = statistics.mean(len(b) * max(map(len, b)) for b in pack(sequences, 64)) * 0.5
    noisy = PaddedTokenCost(0.5, slow_calls=2 * batches)  # a neighbour's load through two of three rounds
    layout = calibrate({1: noisy}, [(1, 1)], sequences, budgets=(64,), rounds=3)
    assert 0.9 * expected <= layout.batch_ms["1x1 t64"] <= 1.4 * expected  # not the slowed median
    assert layout.measured["1x1 t64"] < 0.8 * 12 / (expected * batches / 1000)  # throughput stays the median


def test_choose_layout_measures_the_real_model(tiny_model) -> None:
    cores = available_cores()
    layout, runners = choose_layout(load_artifact(tiny_model))
    assert layout.streams * layout.threads == cores and layout.batch_tokens in TOKEN_BUDGETS
    assert len(layout.measured) == len(candidate_shapes(cores)) * len(TOKEN_BUDGETS)
    assert all(value > 0 for value in layout.measured.values())
    assert layout.batch_ms.keys() == layout.measured.keys() and all(ms > 0 for ms in layout.batch_ms.values())
    quick, _ = choose_layout(load_artifact(tiny_model), max_batch_ms=1e-6)  # no batch that quick: smallest
    assert quick.batch_tokens == min(TOKEN_BUDGETS)
    for threads, runner in runners.items():
        assert isinstance(runner, ModelRunner)
        assert runner.session.get_session_options().intra_op_num_threads == threads
    assert {layout.threads, cores} <= set(runners)  # the layout's runner, and one with every core
    fixed, quiet = choose_layout(load_artifact(tiny_model), "1x1", 96, spin_alone=False)
    assert (fixed.streams, fixed.threads, fixed.batch_tokens, fixed.reason) == (1, 1, 96, "configured")
    assert fixed.backlog_tokens == 0  # a fixed budget grows only where that is configured too
    grown, _ = choose_layout(load_artifact(tiny_model), "1x1", 96, backlog_tokens=192)
    assert (grown.batch_tokens, grown.backlog_tokens) == (96, 192) and "configured" in grown.backlog_reason
    assert choose_layout(load_artifact(tiny_model), "1x1", 96, backlog_tokens=1)[0].backlog_tokens == 0
    # Only the every-core session spins (it runs alone), and only while a run lasts; none when turned off.
    assert {threads: spinning(runner) for threads, runner in runners.items()} == {
        threads: ("1", f"1 {SPIN_US}") if threads == cores else ("0", "") for threads in runners}
    assert {spinning(runner) for runner in quiet.values()} == {("0", "")}


def spinning(runner: ModelRunner) -> tuple[str, str]:
    """(allow spinning, how it is bounded: '1 10' = stops at the run's end, sleeps after 10 us idle)."""
    options = runner.session.get_session_options()
    bounds = []
    for key in ("session.force_spinning_stop", "session.intra_op.spin_duration_us"):
        with contextlib.suppress(RuntimeError):  # raised when never set
            bounds.append(options.get_session_config_entry(key))
    return options.get_session_config_entry("session.intra_op.allow_spinning"), " ".join(bounds)


def test_the_service_reports_the_layout_it_measured(tiny_model, tmp_path) -> None:
    with running_service(tiny_model, tmp_path, SENTIMENT_LAYOUT="auto", SENTIMENT_MAX_BATCH_TOKENS="0") as svc, \
            svc.client() as client:
        serving = client.get("/v1/model").json()["serving"]
        assert client.post("/v1/sentiment", json={"texts": ["fine", "awful"]}).status_code == 200
    assert serving["streams"] * serving["threads"] == available_cores()
    assert serving["batch_tokens"] in TOKEN_BUDGETS and "measured here" in serving["reason"]
    assert serving["measured_batch_ms"].keys() == serving["measured_texts_per_s"].keys()
    assert serving["backlog_batch_tokens"] in (0, 2 * serving["batch_tokens"]) and serving["backlog_reason"]
    assert '"layout chosen"' in svc.log.read_text()


def test_a_queue_deeper_than_the_deadline_is_warned_of_with_the_depth_that_fits(caplog) -> None:
    measured = Layout(2, 1, 64, measured={"2x1 t64": 300.0, "2x1 t128": 900.0})
    with caplog.at_level(logging.WARNING, logger="sentiment.engine"):
        warn_if_queue_outlasts_deadline(measured, Settings(queue_size=512, request_timeout_s=5.0))  # 1.7 s of work
        warn_if_queue_outlasts_deadline(Layout(2, 1, 64), Settings(queue_size=4096))  # fixed: no rate
        assert not caplog.records
        warn_if_queue_outlasts_deadline(measured, Settings(queue_size=4096, request_timeout_s=5.0))  # 13.7 s of work
    [record] = caplog.records
    assert record.getMessage() == "queue deeper than the deadline"
    assert record.seconds_of_work == 13.7 and "SENTIMENT_QUEUE_SIZE at most 1500" in record.advice
